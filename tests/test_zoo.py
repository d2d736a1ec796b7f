import torch

from edgecompress.measure import measure
from edgecompress.task import evaluate
from edgecompress.zoo import BUILTINS, ZOO_VERSION, baseline, data, models

FLOORS = {"digits-lenet300": 0.96, "digits-lenet5": 0.96, "mnist1d-cnn": 0.90}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_architectures_have_the_published_sizes(task):
    assert n_params(models.lenet300()) == 266_610
    assert n_params(models.lenet5()) == 431_080
    m = measure(task("digits-lenet5").model, task("digits-lenet5"), latency=False)
    assert m.macs == 2_293_000
    assert measure(task("digits-lenet300").model, task("digits-lenet300"), latency=False).macs == 266_200


def test_digits_split_is_fixed_stratified_and_in_unit_range():
    (xtr, ytr), (xv, yv), (xt, yt) = data.digits()
    assert (len(ytr), len(yv), len(yt)) == (1078, 359, 360)
    assert xtr.shape[1:] == (1, 28, 28) and float(xtr.min()) >= 0.0 and float(xtr.max()) <= 1.0
    assert torch.bincount(yt).tolist() == [35, 37, 35, 37, 36, 37, 36, 36, 35, 36]
    (xtr2, _), _, _ = data.digits.__wrapped__()
    assert torch.equal(xtr, xtr2)


def test_mnist1d_is_generated_offline_with_default_arguments():
    (xtr, ytr), (xv, yv), (xt, yt) = data.mnist1d()
    assert len(ytr) + len(yv) == 4000 and len(yt) == 1000
    assert xtr.shape[1:] == (1, 40)


def test_baselines_reach_their_accuracy_floor(task):
    for name, floor in FLOORS.items():
        t = task(name)
        assert evaluate(t.model, t) >= floor, name


def test_baseline_cache_round_trips_through_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    a = baseline("digits-lenet300")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"digits-lenet300-v{ZOO_VERSION}.safetensors"]  # the version retrains old caches
    b = baseline("digits-lenet300")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (tmp_path / files[0]).write_bytes(b"not safetensors")
    c = baseline("digits-lenet300")
    assert all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_every_builtin_is_addressable():
    assert {"digits-lenet300", "digits-lenet5", "mnist1d-cnn"} <= set(BUILTINS)
