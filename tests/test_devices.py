"""Device profiles: shipped YAML with cited energy figures, real flash and RAM per row, estimates labelled
as such, constraints that name the layer or tensor over budget, exit code 1 from the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from edgecompress.cli import app
from edgecompress.deploy import check, evaluate
from edgecompress.devices import NAMES, Device, load_device
from edgecompress.errors import RecipeError
from edgecompress.export import c as cexp
from edgecompress.export.ir import lower_task, plan_arena
from edgecompress.pipeline import _device
from edgecompress.recipe import Recipe

needs_arm = pytest.mark.skipif(not cexp.have_toolchain(), reason="make toolchain installs arm-none-eabi-gcc")


def test_shipped_profiles_load_and_cite_their_energy_source():
    assert NAMES == ("cortex-m0", "cortex-m4", "esp32-s3", "jetson-orin-nano", "nrf52840", "rp2040", "rpi4", "stm32f746", "stm32l476")
    for name in NAMES:
        d = load_device(name)
        assert isinstance(d, Device) and d.name == name
        assert "Horowitz" in d.energy.source and "ISSCC 2014" in d.energy.source
        assert "datasheet" in d.datasheet.lower() or "product" in d.datasheet.lower(), name
        if d.runtime == ["c"]:  # instructions are counted on the QEMU machine of the profile's core
            assert d.qemu_machine == cexp.TARGETS[d.core].machine and d.cycles_per_instruction > 0, name
        else:
            assert d.qemu_machine is None
    m4 = load_device("cortex-m4")
    assert (m4.flash_bytes, m4.ram_bytes, m4.runtime) == (1 << 20, 256 << 10, ["c"])
    boards = {n: (load_device(n).core, load_device(n).clock_hz, load_device(n).flash_bytes, load_device(n).ram_bytes,
                  load_device(n).qemu_machine) for n in ("nrf52840", "stm32f746", "rp2040", "stm32l476")}
    assert boards == {"nrf52840": ("cortex-m4", 64e6, 1 << 20, 256 << 10, "mps2-an386"),
                      "stm32f746": ("cortex-m7", 216e6, 1 << 20, 320 << 10, "mps2-an500"),
                      "rp2040": ("cortex-m0plus", 133e6, 2 << 20, 264 << 10, "microbit"),
                      "stm32l476": ("cortex-m4", 80e6, 1 << 20, 128 << 10, "mps2-an386")}


def test_bad_device_names_are_one_line():
    with pytest.raises(RecipeError) as e:
        load_device("arduino")
    assert str(e.value) == ("device must be one of cortex-m0, cortex-m4, esp32-s3, jetson-orin-nano, nrf52840, rp2040, rpi4, stm32f746, stm32l476 or a profile .yaml "
                            "file; got 'arduino'")
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}], "device": "arduino"})
    assert str(e.value) == "recipe: device must be one of cortex-m0, cortex-m4, esp32-s3, jetson-orin-nano, nrf52840, rp2040, rpi4, stm32f746, stm32l476; got 'arduino'"
    r = Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}], "constraints": {"max_ram": 1000}})
    with pytest.raises(RecipeError) as e:
        _device(r)
    assert str(e.value) == ("constraints.max_ram needs a device (device: one of cortex-m0, cortex-m4, esp32-s3, "
                            "jetson-orin-nano, nrf52840, rp2040, rpi4, stm32f746, stm32l476); got none")


@needs_arm
def test_c_device_metrics_are_measured_and_estimates_follow_their_model(task, tmp_path):
    t = task("mnist1d-cnn")
    dev = load_device("cortex-m4")
    m = evaluate(t.model, t, dev, tmp_path)
    g = lower_task(t.model, t, "c")
    exp = cexp.export_c(g, tmp_path / "again", name="model")
    assert m.flash_bytes == cexp.arm_size(exp, "cortex-m4").flash
    assert m.ram_bytes == plan_arena(g).peak == 3840
    assert m.macs == 387_840
    weights = sum(exp.formats[op.layer].nbytes + 4 * op.qbias.size for op in g.ops if op.qweight is not None)
    acts = sum(sum(g.tensors[i].size for i in op.inputs) + g.tensors[op.output].size
               for op in g.ops if op.kind != "reshape")
    assert m.bytes_moved == weights + acts
    x = torch.cat([xb for xb, _ in t.eval_data])[:2]
    count = cexp.count_instructions(exp, g.quantize_input(x), "cortex-m4")
    assert m.instructions == count.per_inference and count.instructions_per_tick == 40.0
    assert m.cycles_est == pytest.approx(m.instructions * 1.3)
    assert m.instr_latency_ms_est == pytest.approx(m.instructions * 1.3 / 64e6 * 1e3)
    assert m.instructions_source == ("executed instructions per inference under qemu-system-arm -M mps2-an386 "
                                     "-icount shift=0 (40 per SysTick tick)")
    assert list(m.weight_formats) == ["conv1", "conv2", "conv3", "fc"]
    assert m.latency_ms_est == pytest.approx((387_840 * 4.0 + (weights + acts) * 1.0) / 64e6 * 1e3)
    assert m.energy_uj_est == pytest.approx((387_840 * 0.3 + weights * 12.5 + acts * 2.5) * 1e-6)
    assert "cycles" in m.estimate_model and "Horowitz" in m.estimate_model


def test_tflite_micro_and_onnxruntime_profiles(task, tmp_path):
    pytest.importorskip("tflite_micro")
    from edgecompress.export.onnx import export_onnx
    from edgecompress.export.tflite import tflm_arena_bytes, to_tflite

    t = task("mnist1d-cnn")
    m = evaluate(t.model, t, load_device("esp32-s3"), tmp_path / "esp")
    data = (tmp_path / "esp" / "model.tflite").read_bytes()
    assert m.flash_bytes == len(data) == len(to_tflite(lower_task(t.model, t, "tflite")))
    assert m.ram_bytes == tflm_arena_bytes(data)
    onnx = export_onnx(t.model, t.example_input, tmp_path / "m.onnx")
    ort = load_device("rpi4").model_copy(update={"runtime": ["onnxruntime"], "tvm_target": None})  # ORT alone:
    m = evaluate(t.model, t, ort, tmp_path / "pi", onnx)  # rpi4's .pte and TVM library: tests/test_runtimes.py
    assert (m.precision, m.flash_bytes, m.ram_bytes) == ("fp32", onnx.stat().st_size, 4 * 3840)


@needs_arm
def test_a_model_that_does_not_fit_names_the_tensor_and_the_excess(task, tmp_path):
    t = task("digits-lenet5")
    dev = load_device("cortex-m0")
    m = evaluate(t.model, t, dev, tmp_path)
    lines = check(m, dev)
    assert len(lines) == 2
    # each layer's bytes are its C format's, the smallest for its trained codes (measured on one machine:
    # dense int8 codes plus int32 biases, fc1 402,000 B, conv2 25,200 B, fc2 5,040 B, with the sparse format
    # only 120 B behind on fc2), so a bound: at most dense, and the three largest by the shapes alone
    top = sorted(m.weights_by_layer.items(), key=lambda kv: -kv[1])[:3]
    dense = {"fc1": 800 * 500 + 4 * 500, "conv2": 50 * 20 * 25 + 4 * 50, "fc2": 500 * 10 + 4 * 10}
    assert [k for k, _ in top] == ["fc1", "conv2", "fc2"] and all(0 < v <= dense[k] for k, v in top), top
    assert lines[0].startswith(f"flash: {m.flash_bytes:,} bytes (C library for cortex-m0 (arm-none-eabi-size "
                               f"text+data)) exceed cortex-m0 flash 65,536 by {m.flash_bytes - 65536:,} bytes; "
                               "largest weights: " + ", ".join(f"{k} {v:,} B" for k, v in top))
    assert lines[1] == ("RAM: 14,400 bytes of activations (static arena planned from tensor lifetimes) exceed "
                        "cortex-m0 RAM 8,192 by 6,208 bytes; while layer pool1 runs, 14,400 bytes are live: "
                        "conv1 24x24x20 (11,520 B) + pool1 12x12x20 (2,880 B)")
    tight = check(m, load_device("cortex-m4"), max_ram=10_000, max_latency_ms=50)
    assert tight[0].startswith("RAM: 14,400 bytes of activations (static arena planned from tensor lifetimes) "
                               "exceed max_ram 10,000 by 4,400 bytes;")
    assert tight[1].startswith(f"latency: estimated {m.latency_ms_est:.3f} ms exceeds max_latency_ms 50 by ")
    assert "most MACs: conv2 1,600,000, fc1 400,000" in tight[1]


@needs_arm
def test_cli_reports_device_columns_and_exits_1_when_over_budget(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: mnist1d-cnn\ndevice: nrf52840\nstages:\n  - {stage: prune, sparsity: 0.3}\n"
                      "constraints: {max_ram: 2048}\nexport: [c, tflite]\nmeasure: {latency: false}\n")
    r = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    dev = report["rows"][-1]["device"]
    assert (dev["device"], dev["ram_bytes"], dev["precision"]) == ("nrf52840", 3840, "int8")
    assert dev["instructions"] > dev["macs"] and dev["instr_latency_ms_est"] > 0
    assert report["violations"] == [
        "RAM: 3,840 bytes of activations (static arena planned from tensor lifetimes) exceed max_ram 2,048 by "
        "1,792 bytes; while layer conv2 runs, 3,840 bytes are live: relu1 1x40x64 (2,560 B) + relu2 1x20x64 (1,280 B)"]
    out = tmp_path / "out"
    assert (out / "model.tflite").stat().st_size > 0 and (out / "model-fp32.tflite").stat().st_size > 0
    assert {p.name for p in (out / "c").iterdir()} >= {"model.c", "model.h", "ec_kernels.c", "ec_kernels.h",
                                                      "model_test.c"}


def test_result_writes_tflite_and_c(task, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from edgecompress.export.tflite import read_model
    from edgecompress.pipeline import Result

    t = task("mnist1d-cnn")
    res = Result(model=t.model, report=None, recipe=None, task=t)
    model = read_model(res.export_tflite(tmp_path / "m.tflite").read_bytes())
    assert [model.operatorCodes[o.opcodeIndex].builtinCode for o in model.subgraphs[0].operators] == [
        3, 34, 3, 34, 3, 22, 9]  # CONV_2D, PAD + CONV_2D twice (torch pads both sides), RESHAPE, FULLY_CONNECTED
    out = res.export_c(tmp_path / "c", name="net")
    assert (out / "net.h").read_text().count("#define NET_ARENA_SIZE 3840") == 1


@needs_arm
def test_measure_instructions_false_skips_the_qemu_count_and_keeps_flash_and_ram():
    import edgecompress as ec

    recipe = {"task": "mnist1d-cnn", "device": "nrf52840", "stages": [{"stage": "prune", "sparsity": 0.3}],
              "measure": {"latency": False}}
    counted = ec.compress(None, ec.Recipe.from_dict(recipe)).report.rows[-1].device
    recipe["measure"]["instructions"] = False
    skipped = ec.compress(None, ec.Recipe.from_dict(recipe)).report.rows[-1].device
    assert counted.instructions > counted.macs and skipped.instructions is None
    assert (skipped.flash_bytes, skipped.ram_bytes) == (counted.flash_bytes, counted.ram_bytes)
