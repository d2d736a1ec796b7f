"""An ensemble on a microcontroller: its members measured alone, then the one C library that runs
them one after another in a shared arena (``export.c.ensemble``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..devices import Device, DeviceMetrics
from ..errors import ArtifactError
from ..export.c import ensemble as ce
from ..export.c import have_toolchain
from ..primitives.ensemble import Ensemble
from .cost import counted_instructions, evaluate_model


def evaluate_ensemble(model: Ensemble, task, device: Device, workdir: str | os.PathLike,
                      weight_format: str | dict[str, str] = "auto", count: bool = True) -> DeviceMetrics:
    """``evaluate`` of an ensemble on a C device: each member measured alone (its flash, RAM,
    instructions and estimates), then the ensemble's own library: its flash (every member's object,
    the combiner and the kernels once), its RAM (the shared arena) and its instructions (measured)."""
    workdir = Path(workdir)
    n = len(model.members)
    formats = ce.member_formats(weight_format, n)
    alone = [evaluate_model(m, task, device, workdir / f"member{i}", weight_format=f, count=count)
             for i, (m, f) in enumerate(zip(model.members, formats))]
    exp = ce.export_ensemble(model, task, workdir / "ensemble", weight_format=weight_format, n_tests=2)
    size = ce.arm_size(exp, device.core)
    notes = [f"members[{i}]: {line}" for i, a in enumerate(alone) for line in a.notes]
    rams = [a.ram_bytes for a in alone]
    notes.append(f"the {n} members run one after another in one arena of {exp.arena:,} B (the largest member's; "
                 f"alone they take {', '.join(f'{r:,}' for r in rams)} B, {sum(rams):,} B together); flash: "
                 f"{' + '.join(f'{b:,}' for b in size.members)} B of members, {size.combiner:,} B of combiner "
                 f"({exp.combine}) and {size.kernels:,} B of kernels compiled once")
    counted: dict = {}
    if count and have_toolchain():
        x = torch.cat([xb for xb, _ in task.eval_data])[:2]
        try:
            c = ce.count_instructions(exp, exp.graph.quantize_input(x), device.core)
        except ArtifactError as e:
            notes.append(f"{device.name}: instructions not counted under QEMU ({e})")
        else:
            counted = counted_instructions(c, device, " of the whole ensemble")
            if all(a.instructions is not None for a in alone):
                each = [a.instructions for a in alone]
                notes.append(f"instructions: members alone {' + '.join(f'{v:,}' for v in each)} = {sum(each):,}; "
                             f"the ensemble {c.per_inference:,} (the rest is the combiner's float maths and calls)")
    big = int(np.argmax(rams))

    def prefixed(key: str) -> dict:
        return {f"members.{i}.{k}": f"members.{i}.{v}" if key == "weight_formats" else v
                for i, a in enumerate(alone) for k, v in getattr(a, key).items()}

    return DeviceMetrics(
        device.name, "c", f"C library for {device.core}: {n} members in one arena and the {exp.combine} combiner "
        "(arm-none-eabi-size text+data)", "int8", size.total.flash, max(exp.arena, size.total.ram),
        "one static arena the members share, running one after another (the largest member's plan)",
        sum(a.macs for a in alone), sum(a.bytes_moved for a in alone), sum(a.latency_ms_est for a in alone),
        sum(a.energy_uj_est for a in alone), "the sum of the members' estimates (the combiner not counted); "
        "members[0]: " + alone[0].estimate_model, prefixed("weights_by_layer"), prefixed("macs_by_layer"),
        f"members[{big}]: {alone[big].peak_at}", notes, weight_formats=prefixed("weight_formats"),
        members=[{"member": i, "flash_bytes": a.flash_bytes, "ram_bytes": a.ram_bytes, "object_flash_bytes": b,
                  "instructions": a.instructions} for i, (a, b) in enumerate(zip(alone, size.members))],
        **counted)
