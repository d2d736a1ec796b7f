"""The integer IR every device export shares: a PyTorch model lowered to int8 ops over NHWC tensors.

The C export writes it, the TFLite export serialises it and the integer reference (``run_int``)
executes it, so all three compute the same integers. Read top-down:

- ``graph``: the IR types (``Graph``, ``Op``, ``Tensor``, ``QParams``);
- ``trace``: the model as an fx graph module, and what each node computes;
- ``lower``: fx nodes to ops (``lower``, ``lower_task``; ``SUPPORTED`` lists the layers);
- ``qparams``: every activation grid, weight and bias code and fixed-point multiplier;
- ``interpret``: the integer reference;
- ``arena``: where each activation lives in one RAM arena.
"""
from .arena import ArenaPlan, plan_arena
from .graph import Graph, Op, QParams, Tensor, act_range, to_nhwc
from .interpret import run_int
from .lower import SUPPORTED, lower, lower_task
from .qparams import lut_table

__all__ = ["SUPPORTED", "ArenaPlan", "Graph", "Op", "QParams", "Tensor", "act_range", "lower", "lower_task",
           "lut_table", "plan_arena", "run_int", "to_nhwc"]
