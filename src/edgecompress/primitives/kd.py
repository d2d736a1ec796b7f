"""Knowledge-distillation losses. Pure functions of tensors.

``kd_loss`` is Hinton et al. (2015): ``T^2 * KL(p_teacher^T || p_student^T)`` averaged over the
batch, where ``p^T = softmax(logits / T)``; the ``T^2`` keeps gradient magnitudes comparable across
temperatures. Several teachers form an ensemble: their softened probabilities (or logits) are
averaged with the given weights. ``feature_loss`` is the FitNets hint loss: mean squared error
between a (projected) student feature map and the teacher's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional as F

Ensemble = Literal["probs", "logits"]


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    w = [1.0] * n if weights is None else [float(v) for v in weights]
    if len(w) != n or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum; got {list(w)}")
    total = sum(w)
    return [v / total for v in w]


def teacher_probs(teacher_logits: torch.Tensor | Sequence[torch.Tensor], *, temperature: float,
                  weights: Sequence[float] | None = None, ensemble: Ensemble = "probs") -> torch.Tensor:
    """Softened target distribution of one teacher or a weighted ensemble of teachers.

    ``ensemble="probs"`` averages the teachers' softened distributions (a mixture);
    ``"logits"`` averages their logits and softens the result.
    """
    logits = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    w = _weights(len(logits), weights)
    if ensemble == "logits":
        return F.softmax(sum(wi * t for wi, t in zip(w, logits)) / temperature, dim=-1)
    return sum(wi * F.softmax(t / temperature, dim=-1) for wi, t in zip(w, logits))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | Sequence[torch.Tensor], *,
            temperature: float, weights: Sequence[float] | None = None, ensemble: Ensemble = "probs") -> torch.Tensor:
    """Hinton's distillation loss ``T^2 * KL(p_t || p_s)``, summed over classes, mean over the batch.

    Gradients flow to ``student_logits`` only; teacher logits are detached.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.detach()
    else:
        teacher_logits = [t.detach() for t in teacher_logits]
    target = teacher_probs(teacher_logits, temperature=temperature, weights=weights, ensemble=ensemble)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature ** 2


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Average-pool a student feature map ``[N, C, *S]`` to the teacher's spatial size."""
    if student.dim() <= 2 or student.shape[2:] == teacher.shape[2:]:
        return student
    pool = F.adaptive_avg_pool1d if student.dim() == 3 else F.adaptive_avg_pool2d
    return pool(student, teacher.shape[2:])


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error against the detached teacher feature. ``student`` must
    already have the teacher's width (project it first where widths differ)."""
    student = match_spatial(student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"feature shapes must match after projection; got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    return F.mse_loss(student, teacher.detach())
