"""A thin wrapper over Torch-Pruning's DependencyGraph: structured pruning that physically removes
channels, with residual adds, concatenation, depthwise/grouped convolutions and batch norm kept
consistent by the graph.

What this wrapper adds: layers addressed by name; fresh dicts for Torch-Pruning's group arguments
(its defaults are shared mutable dicts that leak between pruners); group scores (``GroupScores``)
reduced from the scores of the stage's importance (``importance.py``), so every criterion means the
same thing structured or not; layers it cannot handle are reported, never a crash; a model it cannot
trace is one line naming the layer.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import RecipeError
from ...layers import output_layers, weighted_layers
from ...primitives.attention import Attention

# Element scores of a parameter (same shape as it), or per-channel input activation scores of a layer.
ParamScores = Mapping[int, torch.Tensor]       # id(parameter) -> scores
InputScores = Mapping[nn.Module, torch.Tensor]  # layer -> one score per input channel
ScoredTypes = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def _tp():
    import torch_pruning as tp

    return tp


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _failing_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The innermost named module whose forward was running when the model's forward failed."""
    stack: list[str] = []
    failed: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue
        hooks.append(m.register_forward_pre_hook(lambda _m, _i, n=name: stack.append(n)))
        hooks.append(m.register_forward_hook(lambda _m, _i, _o: stack.pop() and None))
    try:
        with torch.enable_grad():
            model(example)
    except Exception:
        failed = list(stack)
    finally:
        for h in hooks:
            h.remove()
    return failed[-1] if failed else None


def _channel_shuffle(model: nn.Module, example: torch.Tensor) -> tuple[str, str] | None:
    """The innermost named module (and its type) that reshapes a 4-D activation into 5 dimensions
    splitting its channels, as ShuffleNet's channel shuffle does; None when no module does."""
    from torch.overrides import TorchFunctionMode

    stack: list[str] = []
    found: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") in ("view", "reshape") and args and torch.is_tensor(args[0]) \
                    and args[0].dim() == 4 and torch.is_tensor(out) and out.dim() == 5 and stack and not found:
                found.append(stack[-1])
            return out

    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(lambda _m, _i, n=name: stack.append(n)))
            hooks.append(m.register_forward_hook(lambda _m, _i, _o: stack.pop() and None))
    try:
        with torch.no_grad(), Watch():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return (found[0], type(model.get_submodule(found[0])).__name__) if found else None


def _graph_breaks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Named modules that take a tensor tracked by autograd and return one that is not (a
    ``no_grad`` block, a NumPy round trip): the dependency graph cannot follow channels through them."""
    breaks: list[str] = []

    def hook(_m, inputs, output, name):
        ins = [t for t in inputs if torch.is_tensor(t)]
        outs = [t for t in (output if isinstance(output, tuple | list) else [output]) if torch.is_tensor(t)]
        if any(t.requires_grad for t in ins) and outs and not any(t.requires_grad for t in outs):
            breaks.append(name)

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            model(example)
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    return [b for b in breaks if not any(o.startswith(b + ".") for o in breaks)]


class GroupScores:
    """A Torch-Pruning importance: one score per channel of a coupled group, the mean over the
    group's members of their per-channel sums of element scores (or of input activation scores)."""

    def __init__(self, params: ParamScores | None = None, inputs: InputScores | None = None, normalize: bool = False):
        self.params = params or {}
        self.inputs = inputs
        self.normalize = normalize

    def _local(self, dep, idxs: list[int]) -> torch.Tensor | None:
        tp = _tp()
        f = tp.pruner.function
        layer, fn = dep.target.module, dep.handler
        if self.inputs is not None:
            if fn in (f.prune_conv_in_channels, f.prune_linear_in_channels) and layer in self.inputs:
                return self.inputs[layer][idxs]
            return None
        w = getattr(layer, "weight", None)
        if w is None or id(w) not in self.params:
            return None
        s = self.params[id(w)]
        if fn in (f.prune_conv_out_channels, f.prune_linear_out_channels, f.prune_depthwise_conv_out_channels):
            return s[idxs].flatten(1).sum(1)
        if fn in (f.prune_conv_in_channels, f.prune_linear_in_channels):
            local = s.transpose(0, 1).flatten(1).sum(1)
            if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups not in (1, layer.in_channels):
                local = local.repeat(layer.groups)
            return local[idxs]
        if fn == f.prune_batchnorm_out_channels:
            return s[idxs]
        return None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        total, count = None, 0
        for i, (dep, idxs) in enumerate(group):
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            local = self._local(dep, list(idxs))
            if local is None:
                continue
            if total is None:
                total = torch.zeros(len(group[0][1]), dtype=torch.float32)
            total.scatter_add_(0, torch.tensor(root), local.float())
            count += 1
        if total is None:
            return None
        total /= count
        return total / total.mean().clamp_min(1e-12) if self.normalize else total


@dataclass
class Plan:
    """What a structured prune did: every selected layer touched (with its new shape) or skipped."""

    touched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def shape(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.out_channels, m.in_channels


class Pruner:
    """Build once per model: ``Pruner(model, example, selected, where)``, then ``prune(...)``.

    ``selected`` are the layer names whose output channels may be removed; every other layer is
    held (its input channels still shrink when a producer it reads from is pruned).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, selected: Sequence[str], where: str = ""):
        self.model, self.example, self.where = model, example, where
        self.layers = weighted_layers(model)
        self.plan = Plan()
        outputs = set(output_layers(model, example))
        self.selected = [n for n in selected if n not in outputs]
        for n in selected:
            if n in outputs:
                self.plan.skipped[n] = "output layer: its channels are the model's outputs"
        self._hold_residual_stream(model)
        self.held = [m for n, m in self.layers.items() if n not in self.selected]
        self.held += [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.Embedding)) and self.stream]
        self.names = {m: n for n, m in model.named_modules()}
        self.graph = self._build_graph()
        self.groups = self._groups()
        self.meta = None  # the last Torch-Pruning pruner built (for inspection)

    def _hold_residual_stream(self, model: nn.Module) -> None:
        """In a Hugging Face transformer (BERT-style self-attention) the residual stream's width is the
        model's output (a sentence embedding, the hidden states) and unused branches (the pooler) read
        it: it keeps its width, and channel pruning removes whole heads and FFN channels only."""
        hf = [m for m in model.modules() if _head_projections(m)[0] and not isinstance(m, Attention)]
        self.stream = {m.query.in_features for m in hf}
        projections = {id(p) for m in hf for p in _head_projections(m)[0]}
        for n in list(self.selected):
            m = self.layers[n]
            if isinstance(m, nn.Linear) and m.out_features in self.stream and id(m) not in projections:
                self.selected.remove(n)
                self.plan.skipped[n] = (f"writes the transformer's residual stream (width {m.out_features}), which "
                                        "keeps its width: heads and FFN channels are pruned instead")

    def _build_graph(self):
        tp = _tp()
        breaks = _graph_breaks(self.model, self.example)
        if breaks:
            raise RecipeError(f"{self.where}: the dependency graph cannot trace the model at layer {breaks[0]!r}: "
                              "its output is cut off from autograd (no_grad or a non-torch round trip)")
        shuffle = _channel_shuffle(self.model, self.example)
        if shuffle:
            name, kind = shuffle
            raise RecipeError(f"{self.where}: channel pruning cannot follow channels through layer {name!r} ({kind}): "
                              "it reshapes the channel dimension of a 4-D activation (a channel shuffle), which "
                              "Torch-Pruning's dependency graph does not map; granularity unstructured, balanced "
                              "or nm prunes this model")
        try:
            with _quiet():
                return tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example)
        except Exception as e:  # Torch-Pruning raises whatever the traced code raises
            layer = _failing_layer(self.model, self.example)
            at = f" at layer {layer!r}" if layer else ""
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise RecipeError(f"{self.where}: the dependency graph cannot trace the model{at}: "
                              f"{type(e).__name__}: {first}") from None

    def _groups(self) -> dict[str, list[str]]:
        """Each prunable group, named by its root layer, with the names of the layers whose output
        channels it removes together. Selected layers outside any group are skipped with the reason."""
        groups: dict[str, list[str]] = {}
        seen: set[str] = set()
        tp = _tp()
        traced = set(self.graph.module2node)
        for n in self.selected:
            if self.layers[n] not in traced:
                self.plan.skipped[n] = "not reached by the dependency graph when tracing the example input"
        with _quiet():
            for group in self.graph.get_all_groups(ignored_layers=self.held,
                                                   root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]):
                members = [self.names[d.target.module] for d, _ in group
                           if self.graph.is_out_channel_pruning_fn(d.handler) and d.target.module in self.layers.values()]
                if members:
                    groups[members[0]] = members
                    seen.update(members)
        for n in self.selected:
            if n not in seen and n not in self.plan.skipped:
                m = self.layers[n]
                if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
                    why = "depthwise: its channels follow the layer that feeds it"
                else:
                    why = "its output channels are tied to a held layer (excluded or an output)"
                self.plan.skipped[n] = why
        return groups

    def prune(self, importance: Callable, ratio: float = 0.0, per_group: Mapping[str, float] | None = None,
              global_ranking: bool = False, max_ratio: float = 0.95) -> Plan:
        """Remove channels: ``ratio`` of each group's channels (ranked within the group, or across
        all groups when ``global_ranking``), or ``per_group[root]`` for the groups named there."""
        tp = _tp()
        before = {n: shape(m) for n, m in self.layers.items()}
        per_group = dict(per_group or {})
        ratio_dict = {self.layers[n]: float(r) for n, r in per_group.items() if n in self.groups}
        with _quiet():
            heads = self._heads()
            head_ratio = ratio if ratio > 0 else max(per_group.values(), default=0.0)
            pruner = tp.pruner.MetaPruner(
                self.model, self.example, importance=importance, global_pruning=global_ranking,
                pruning_ratio=ratio, pruning_ratio_dict=ratio_dict or None, max_pruning_ratio=max_ratio,
                ignored_layers=list(self.held), in_channel_groups={}, out_channel_groups={}, num_heads=heads,
                prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=head_ratio if heads else 0.0,
                root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR])
            try:
                pruner.step()
            except (RuntimeError, IndexError) as e:
                grouped = [(n, m) for n, m in self.layers.items()
                           if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels]
                if not grouped:
                    raise
                n, m = grouped[0]
                raise RecipeError(f"{self.where}: layer {n!r} (Conv{m.weight.dim() - 2}d, groups={m.groups}): "
                                  "Torch-Pruning failed removing channels of a grouped convolution fed by this "
                                  f"graph ({type(e).__name__}: {str(e).splitlines()[0][:80]}); exclude it or use "
                                  "granularity unstructured, balanced or nm") from None
        self.meta = pruner
        self._count_heads()
        for n, m in self.layers.items():
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.out_channels % m.groups:
                raise RecipeError(f"{self.where}: layer {n!r} (Conv{m.weight.dim() - 2}d, groups={m.groups}): channel "
                                  f"pruning left {m.out_channels} output channels, not a multiple of its groups "
                                  "(Torch-Pruning does not keep grouped convolutions whole); exclude it or use "
                                  "granularity unstructured, balanced or nm")
        for n, m in self.layers.items():
            now = shape(m)
            if now != before[n]:
                self.plan.touched[n] = f"out {before[n][0]} -> {now[0]}, in {before[n][1]} -> {now[1]}"
            elif n in self.selected and n not in self.plan.skipped:
                self.plan.skipped[n] = "no channel removed (ratio rounds to zero channels)"
        for n in self.plan.touched:
            self.plan.skipped.pop(n, None)
        return self.plan


    def _heads(self) -> dict[nn.Module, int]:
        """Heads of every attention (``primitives.attention.Attention``) whose projections may shrink:
        Torch-Pruning then removes whole heads from q, k, v and the matching inputs of out_proj together,
        keeping each head's width."""
        held = set(map(id, self.held))
        heads: dict[nn.Module, int] = {}
        for m in self.model.modules():
            projections, n = _head_projections(m)
            if projections and not any(id(p) in held for p in projections):
                heads.update({p: n for p in projections})
        return heads

    def _count_heads(self) -> None:
        for name, m in self.model.named_modules():
            projections, before = _head_projections(m)
            if not projections:
                continue
            width = m.head_dim if isinstance(m, Attention) else m.attention_head_size
            now = projections[0].out_features // width
            if now != before:
                self.plan.notes.append(f"{name}: attention heads {before} -> {now} (head width {width})")
            if isinstance(m, Attention):
                m.num_heads, m.embed_dim = now, m.out_proj.out_features
            else:
                m.num_attention_heads, m.all_head_size = now, projections[0].out_features


def _head_projections(m: nn.Module) -> tuple[tuple[nn.Linear, ...], int]:
    """The q, k, v projections of an attention and its head count: ``primitives.attention.Attention``,
    or a Hugging Face self-attention (``query``, ``key``, ``value``, ``num_attention_heads``,
    ``attention_head_size``, as BERT's); ``((), 0)`` for any other module."""
    if isinstance(m, Attention):
        return (m.q_proj, m.k_proj, m.v_proj), m.num_heads
    parts = tuple(getattr(m, k, None) for k in ("query", "key", "value"))
    if all(isinstance(p, nn.Linear) for p in parts) and isinstance(getattr(m, "num_attention_heads", None), int) \
            and isinstance(getattr(m, "attention_head_size", None), int):
        return parts, m.num_attention_heads
    return (), 0


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` at ``example``'s shape, counted by Torch-Pruning in torch
    (the report's MACs are counted on the exported ONNX graph)."""
    tp = _tp()
    with _quiet():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)
