"""The contract every technique in ``techniques.TECHNIQUES`` keeps (sklearn's parametrize_with_checks).

A technique joins by adding its examples here: at least one (task, spec) variant run through the
pipeline, and one bad field with the exact one-line error it must give. ``test_contract.py`` fails
for a technique in the table without examples.
"""
from __future__ import annotations

EXAMPLES: dict[str, dict] = {
    "prune": {
        "variants": [
            ("digits-lenet300", {"stage": "prune", "sparsity": 0.8, "finetune": {"epochs": 1}}),
            ("mnist1d-cnn", {"stage": "prune", "sparsity": 0.5, "scope": "layer", "norm": 2,
                             "layers": ["re:conv.*"]}),
            ("digits-lenet300", {"stage": "prune", "granularity": "nm", "pattern": "2:4", "schedule": "gradual",
                                 "finetune": {"epochs": 1}}),
            ("digits-lenet300", {"stage": "prune", "sparsity": 0.7, "granularity": "balanced", "criterion": "random",
                                 "schedule": "lottery", "steps": 2, "finetune": {"epochs": 1}}),
            ("digits-lenet5", {"stage": "prune", "sparsity": 0.5, "granularity": "channel", "criterion": "taylor"}),
            ("digits-resnet8", {"stage": "prune", "sparsity": 0.9, "granularity": "block"}),
        ],
        "bad": ({"stage": "prune", "sparsity": 1.5}, "recipe: stages[0].sparsity must be < 1.0; got 1.5"),
    },
    "cluster": {
        "variants": [
            ("digits-lenet300", {"stage": "cluster", "bits": 4, "bias_bits": 5, "finetune": {"epochs": 1}}),
            ("mnist1d-cnn", {"stage": "cluster", "bits": 5, "init": "density", "backend": "sklearn", "iters": 20,
                             "layer_bits": {"fc": 3}, "layers": ["re:conv[23]", "fc"]}),
        ],
        "bad": ({"stage": "cluster", "bits": 9}, "recipe: stages[0].bits must be <= 8; got 9"),
    },
    "lowrank": {
        "variants": [
            ("digits-lenet300", {"stage": "lowrank", "method": "svd", "param_budget": 0.3, "finetune": {"epochs": 1}}),
            ("digits-lenet5", {"stage": "lowrank", "method": "tucker2", "energy": 0.8, "finetune_on": "manifold",
                               "finetune": {"epochs": 1}}),
            ("mnist1d-cnn", {"stage": "lowrank", "method": "cp", "rank": 8, "layers": ["conv2", "conv3"]}),
        ],
        "bad": ({"stage": "lowrank", "energy": 1.5}, "recipe: stages[0].energy must be <= 1.0; got 1.5"),
    },
    "distill": {
        "variants": [
            ("digits-lenet300", {"stage": "distill", "student": "digits-lenet300-tiny",
                                 "train": {"epochs": 1, "distill": {"features": {"fc1": "fc2"}}}}),
        ],
        "bad": ({"stage": "distill", "student": "digits-lenet300-tiny", "train": {"distill": {"alpha": 2}}},
                "recipe: stages[0].train.distill.alpha must be <= 1.0; got 2"),
    },
    "quantize": {
        "variants": [
            ("digits-lenet5", {"stage": "quantize", "mode": "static", "calib_batches": 4}),
            ("digits-lenet300", {"stage": "quantize", "mode": "weight_only", "bits": 4, "granularity": "group",
                                 "group_size": 16}),
        ],
        "bad": ({"stage": "quantize", "mode": "weight_only", "bits": 3},
                "recipe: stages[0].bits must be one of 4, 8, 16 for mode weight_only; got 3"),
    },
    "ensemble": {
        "variants": [
            ("digits-lenet300", {"stage": "ensemble", "combine": "stack", "members": [
                {"model": "digits-lenet300-tiny", "train": {"epochs": 1, "batch_size": 128}},
                {"model": "digits-lenet300-tiny", "train": {"epochs": 1, "batch_size": 128},
                 "stages": [{"stage": "prune", "sparsity": 0.5}]}]}),
        ],
        "bad": ({"stage": "ensemble", "members": [[{"stage": "prune", "sparsity": 0.5}]]},
                "recipe: stages[0].members must list at least 2 members; got 1"),
    },
}
