"""An ensemble as one module: every member runs on the input and their outputs are combined.

``combine`` (outputs read as class logits along dim 1, except ``logits``):
- ``average``: log of the mean of the members' softmax probabilities;
- ``logits``: the mean of the members' outputs (any output, also embeddings);
- ``vote``: one-hot of each member's argmax, summed, plus half the mean probability (ties go to the
  class the members are more sure of; a majority always wins);
- ``weighted``: log of a weighted mean of the probabilities (``weights``, on the simplex);
- ``stack``: a linear combiner on the members' log-probabilities.
The ensemble stage (``techniques.ensemble``) builds one; every exporter takes it as one model.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Ensemble(nn.Module):
    """Runs every member on the input and combines their outputs (see the module docstring)."""

    def __init__(self, members: list[nn.Module], combine: str, weights: torch.Tensor | None = None,
                 combiner: nn.Linear | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine
        if combine == "weighted":
            self.register_buffer("weights", weights if weights is not None else torch.full((len(members),),
                                                                                         1 / len(members)))
        if combine == "stack":
            self.combiner = combiner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_outputs([m(x) for m in self.members], self.combine, getattr(self, "weights", None),
                               getattr(self, "combiner", None))

    def extra_repr(self) -> str:
        return f"combine={self.combine}"


def combine_outputs(outs: list[torch.Tensor], how: str, weights: torch.Tensor | None = None,
                    combiner: nn.Module | None = None) -> torch.Tensor:
    """The members' outputs combined: what ``Ensemble.forward`` computes after running them."""
    if how == "logits":
        return torch.stack(outs).mean(0)
    if how == "stack":
        return combiner(torch.cat([F.log_softmax(o, 1) for o in outs], 1))
    probs = [F.softmax(o, 1) for o in outs]
    if how == "vote":  # one-hot of each argmax (ONNX: ArgMax, OneHot), summed; the mean probability breaks ties
        k = outs[0].shape[1]
        votes = torch.stack([F.one_hot(o.argmax(1), k).to(o.dtype) for o in outs]).sum(0)
        return votes + 0.5 * torch.stack(probs).mean(0)
    w = weights if weights is not None else torch.full((len(outs),), 1 / len(outs))
    mix = (torch.stack(probs) * w.reshape(-1, *[1] * probs[0].dim())).sum(0)
    return torch.log(mix.clamp_min(1e-12))
