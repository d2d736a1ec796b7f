"""The ``quantize`` stage: choose the layers, edit the float model, calibrate, and swap each chosen layer
for its quantized form, logging every layer touched or skipped."""
from __future__ import annotations

import math

from torch import nn

from ...context import Context
from ...errors import RecipeError
from ...layers import match, replace, select, weighted_layers
from ...primitives import quant as Q
from ...primitives.attention import split_attention
from ...primitives.qembedding import QuantEmbedding
from ...primitives.qlayer import QuantLayer, act_quants, nbits_block_ok, quant_layers
from .calibrate import observe, require_calibration
from .edits import bias_correction, equalize, fold_bn
from .gptq import gptq_layer
from .kernels import kernel_notes
from .mixed import mixed_bits
from .placement import Plan, graph_plan, slow_int8_convs
from .policy import resolve
from .qat import train_qat
from .rnn import quantize_recurrent, recurrent_layers
from .spec import QuantizeSpec, stored_bits, weight_spec


def apply(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> nn.Module:
    """The model with the layers ``spec`` chooses quantized; every layer logged in ``ctx.log``. Keys the
    recipe leaves unset follow the quantization policy of the device's runtime (``policy``)."""
    if spec.granularity == "group" and spec.group_size is None:
        raise RecipeError(f"{ctx.where}.group_size is required with granularity: group; got none")
    if spec.bits == "auto" and spec.budget_bits is None and spec.budget_bytes is None:
        raise RecipeError(f"{ctx.where}.budget_bits (or budget_bytes) is required with bits: auto; got none")
    spec = resolve(spec, ctx)
    mode = spec.mode
    if mode in ("static", "qat") or spec.rounding == "gptq" or spec.bits == "auto" or spec.bias_correction:
        require_calibration(spec, ctx)

    split_attention(model, ctx)
    layers = weighted_layers(model)
    rnns = recurrent_layers(model)
    names = select([*layers, *rnns], spec.layers, spec.exclude, where=ctx.where)
    for n in [*layers, *rnns]:
        if n not in names:
            ctx.log.skipped[n] = "excluded by the recipe"
    rnn_done = quantize_recurrent(model, [n for n in names if n in rnns], spec, ctx)
    names = [n for n in names if n in layers]
    if mode == "dynamic":
        explicit = spec.layers is not None
        keep = []
        for n in names:
            if isinstance(layers[n], nn.Linear) or explicit:
                keep.append(n)
            else:
                ctx.log.skipped[n] = ("dynamic mode quantizes Linear layers; ONNX Runtime's ConvInteger runs "
                                      "slower than a float conv (name the layer in layers: to force it)")
        names = keep
    bits_of: dict[str, int] = {}
    for n in list(names):
        layer = layers[n]
        k = layer.weight[0].numel()
        if spec.granularity == "group" and isinstance(layer, nn.Linear) and k % spec.group_size:
            ctx.log.skipped[n] = f"group_size {spec.group_size} does not divide its {k} input features; kept float"
            names.remove(n)
        elif mode == "weight_only" and spec.bits == 4 and isinstance(layer, nn.Linear) \
                and not nbits_block_ok(k, spec.group_size if spec.granularity == "group" else None):
            ctx.log.skipped[n] = (f"MatMulNBits needs a power-of-two block >= 16 dividing its {k} input features "
                                  f"(group_size {spec.group_size}); kept float")
            names.remove(n)
    if spec.reduce_range and mode in ("static", "qat", "dynamic") and 8 in (spec.candidate_bits if spec.bits == "auto" else [spec.bits]):
        ctx.log.notes.append("8-bit weights use 7 bits (reduce_range: true) so that ONNX Runtime's u8s8 integer "
                             "kernels cannot saturate on AVX2 CPUs without VNNI; set reduce_range: false for VNNI or ARM")
    if not names:
        if rnn_done:
            kernel_notes(model, spec, ctx)
        else:
            ctx.log.notes.append("no layer was quantized")
        return model

    if spec.fold_bn and mode in ("static", "qat"):
        fold_bn(model, names, ctx)
    if spec.equalize:
        equalize(model, names, ctx)
    if spec.keep_slow_float and mode in ("static", "qat"):
        for n in slow_int8_convs(model, names, spec, ctx):
            names.remove(n)
        if not names:
            ctx.log.notes.append("no layer was quantized")
            return model

    # mixed precision: bits per layer from sensitivity
    if spec.bits == "auto":
        bits_of = mixed_bits(model, names, spec, ctx)
        sizes = {n: layers[n].weight.numel() for n in names}
        stored = {n: stored_bits(spec, bits_of[n], layers[n]) for n in names}
        avg = sum(sizes[n] * stored[n] for n in names) / sum(sizes.values())
        packed = sum(math.ceil(sizes[n] * stored[n] / 8) for n in names)
        reduced = " (8-bit codes span 7 bits, reduce_range)" if any(stored[n] != bits_of[n] for n in names) else ""
        ctx.log.notes.append("bits: auto chose " + ", ".join(f"{n}={bits_of[n]}" for n in names)
                             + f"; average {avg:.3f} weight bits{reduced}, {packed:,} packed weight bytes "
                               "(estimate; the ONNX file stores codes in int8)")
    else:
        bits_of = {n: int(spec.bits) for n in names}

    # activations fused into the layers; which layer outputs, residual adds and pools get quantizers;
    # which inputs share their producer's quantizer (from the traced graph, or nn.Sequential order)
    static = mode in ("static", "qat")
    plan = Plan()
    if static:
        plan = graph_plan(model, names, spec, ctx)
        model = plan.gm if plan.gm is not None else model
    acts = {n: model.get_submodule(a) if a else nn.ReLU() for n, a in plan.acts.items()}
    want_in = {n for n in names if n not in plan.reads} if static else set()
    need_obs = static or spec.rounding == "gptq"
    obs_in, obs_out, grams = (observe(model, names, acts, spec, ctx, want_in, plan.want_out) if need_obs
                              else ({}, {}, {}))
    aqs = act_quants(model)
    for a in aqs.values():
        a.finish()

    float_weights = {}
    for n in names:
        layer = layers[n]
        w_spec = weight_spec(spec, bits_of[n], layer)
        ql = QuantLayer(layer, "qat" if mode == "qat" else ("static" if mode == "static" else mode),
                        w_spec, None, None, act=acts.get(n))
        if n in obs_in:
            ql.set_spec("in", obs_in[n])
            ql.guard_input = True
        if n in obs_out:
            ql.set_spec("out", obs_out[n])
        float_weights[n] = layer.weight.detach().clone()
        codes = None
        weight_mse = mode == "weight_only" and spec.observer == "mse" and not w_spec.is_float  # observer for weights
        if spec.rounding == "gptq" and not w_spec.is_float and n in grams:
            codes, w_cal = gptq_layer(layer, grams[n], w_spec, weight_mse)
            if mode == "dynamic":  # the scales the export stores as float16; rounded up, the codes stay in range
                w_cal = w_cal.with_params(Q.half_up(w_cal.scale), w_cal.zero_point)
            ql.set_spec("w", w_cal)
        elif weight_mse:
            ql.set_spec("w", Q.calibrate_mse(layer.weight, w_spec))
        ql.freeze(codes)
        if mode == "qat":  # training starts from the float weights
            layer.weight.data.copy_(float_weights[n])
        replace(model, n, ql)
        if plan.acts.get(n):
            replace(model, plan.acts[n], nn.Identity())
    # shared quantizers, in graph order: a consumer's input spec is its producer's output spec
    qls = quant_layers(model)
    for dst, src in plan.reads.items():
        shared = qls[src].out_spec if src in qls else aqs[src].spec
        if dst in qls:
            qls[dst].set_spec("in", shared)
        else:
            aqs[dst].set_spec(shared)
    for a_name, a in aqs.items():
        ctx.log.touched[a_name] = f"{a.kind} output {a.spec.describe()}" + (
            f" (shares {plan.reads[a_name]}'s)" if a_name in plan.reads else "")

    if spec.bias_correction and mode != "dynamic":
        bias_correction(model, ctx, spec, float_weights)

    if mode == "qat" or (spec.finetune is not None and static):
        train_qat(model, spec, ctx)
    elif spec.finetune is not None:  # dynamic, weight_only: the codes must be those of the fine-tuned weights
        ctx.finetune(model, spec.finetune, label=f"{ctx.where} fine-tune")
        for ql in quant_layers(model).values():
            ql.freeze(recalibrate=True)
        ctx.log.notes.append("fine-tuned the float weights, then quantized them again (codes and scales of the "
                             "fine-tuned weights)")

    for n in names:
        ql = qls[n]
        what = f"{mode}: weight {ql.w_spec.describe()}"
        if ql.in_spec is not None:
            what += f", input {ql.in_spec.describe()}"
        if ql.out_spec is not None:
            what += f", output {ql.out_spec.describe()}"
        if ql.act is not None:
            what += f", {type(ql.act).__name__} fused"
        if spec.rounding == "gptq" and n in grams:
            what += ", GPTQ rounding"
        if mode == "weight_only" and spec.observer == "mse" and not ql.w_spec.is_float:
            what += ", MSE-searched weight scales"
        ctx.log.touched[n] = what
    if spec.embeddings and mode != "qat":
        _quantize_embeddings(model, spec, ctx)
    if ctx.inspect:
        kernel_notes(model, spec, ctx)
    return model


def _quantize_embeddings(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    embs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if not embs or spec.layers is not None:
        chosen: list[str] = []
    else:  # exclude: names weighted layers too, so only its patterns that hit an embedding apply here
        chosen = [n for n in embs if not any(n in match(list(embs), p) for p in spec.exclude or [])]
    for n, emb in embs.items():
        if n not in chosen:
            ctx.log.skipped[n] = "embedding not named in layers"
            continue
        if emb.weight.numel() < 1 << 16:
            ctx.log.skipped[n] = f"embedding of {emb.weight.numel():,} values is small; kept float"
            continue
        qe = QuantEmbedding(emb)
        replace(model, n, qe)
        ctx.log.touched[n] = f"embedding {qe.w_spec.describe()} (Gather, then dequantize the rows)"
