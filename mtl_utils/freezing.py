"""Freezing, in words a reader recognises: which parts of a MultiTaskModel train.

Frozen means three things in PyTorch: `requires_grad=False` on the part's parameters, the part in eval mode
(dropout off), and an optimizer that only sees trainable parameters. Every function here changes
`requires_grad` through `_set`, which then puts every frozen part in eval mode (`MultiTaskModel.train`
keeps them there), so no caller has to remember it. `trainable_parameters` is what an optimizer gets.

    freeze_all(model)            # inference: nothing trains
    freeze_backbone(model)       # the heads train on fixed sentence embeddings
    unfreeze_last(model, 2)      # exactly the top 2 transformer layers of the backbone train (like fastai's freeze_to)
    freeze_head(model, "trec")   # ... but head A stays as it is
    unfreeze_all(model)          # everything trains
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from torch import nn

from . import backbone as bb
from .model import MultiTaskModel
from .recipes import FREEZE_SCENARIOS


def _set(model: MultiTaskModel, modules: Iterable[nn.Module], trainable: bool) -> MultiTaskModel:
    """The one place that changes what trains: flags, then modes (frozen parts in eval mode)."""
    for module in modules:
        module.requires_grad_(trainable)
    for module in bb.unused_modules(model.backbone):  # the pooler never gets a gradient: never train it
        module.requires_grad_(False)
    return model.train(model.training)


def freeze_all(model: MultiTaskModel) -> MultiTaskModel:
    """Freeze the whole network, backbone and every head: the model only answers."""
    return _set(model, [model], False)


def freeze_backbone(model: MultiTaskModel) -> MultiTaskModel:
    """Freeze the backbone; every head trains."""
    _set(model, [model.backbone], False)
    return _set(model, [model.heads], True)


def unfreeze_all(model: MultiTaskModel) -> MultiTaskModel:
    """Let everything train: every backbone stage and every head."""
    return _set(model, [model], True)


def unfreeze_last(model: MultiTaskModel, k: int, embeddings: bool = False) -> MultiTaskModel:
    """Exactly the top `k` transformer layers of the backbone train (and the embeddings with `embeddings=True`);
    every other backbone layer is frozen, the heads stay as they are.

    It sets the boundary, like fastai's `freeze_to`: `unfreeze_last(model, 3)` then `unfreeze_last(model, 2)`
    trains two layers, not three.
    """
    total = num_layers(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer from 0 to {total} (the backbone {model.backbone_name!r} has {total} "
                         f"transformer layers); got {k!r}")
    stages = bb.stages(model.backbone)
    _set(model, [model.backbone], False)
    chosen = [m for _, modules in stages[len(stages) - k:] for m in modules] if k else []
    if embeddings:
        chosen += stages[0][1]
    return _set(model, chosen, True)


def freeze_head(model: MultiTaskModel, task: str) -> MultiTaskModel:
    """Freeze one task's head; everything else stays as it is."""
    if task not in model.heads:
        raise ValueError(f"unknown head {task!r}; this model's heads are: {', '.join(model.heads)}")
    return _set(model, [model.heads[task]], False)


_SCENARIOS = {"everything": freeze_all, "backbone": freeze_backbone, "nothing": unfreeze_all}


def freeze(model: MultiTaskModel, scenario: str) -> MultiTaskModel:
    """Apply a freeze scenario by name (the command line's --freeze): everything, backbone or nothing."""
    if scenario not in _SCENARIOS:
        known = "; ".join(f"{k!r}: {v}" for k, v in FREEZE_SCENARIOS.items())
        raise ValueError(f"unknown freeze scenario {scenario!r}; known scenarios are {known}")
    return _SCENARIOS[scenario](model)


def num_layers(model: MultiTaskModel) -> int:
    """Number of transformer layers in the backbone."""
    return len(bb.layers(model.backbone))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should see: only those that train."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """How many parameter values the optimizer sees (the sum over `trainable_parameters`)."""
    return sum(p.numel() for p in trainable_parameters(model))


def backbone_frozen(model: MultiTaskModel) -> bool:
    """True if no backbone parameter trains (so its sentence embeddings never change)."""
    return bb.nothing_trains(model.backbone)


def trainable_summary(model: MultiTaskModel) -> pd.DataFrame:
    """One row per part (embeddings, each layer, each head) with its parameter count and whether it trains, plus totals."""
    records = []
    for name, modules in model.parts():
        params = [p for m in modules for p in m.parameters()]
        group, part = ("head", name.removeprefix("head ")) if name.startswith("head ") else ("backbone", name)
        records.append({
            "group": group,
            "part": part,
            "parameters": sum(p.numel() for p in params),
            "trainable parameters": sum(p.numel() for p in params if p.requires_grad),
            "trains": {True: "yes", False: "no", None: "partly"}[bb.stage_trains(modules)],
        })
    # parameters in no stage (the unused pooler) still count in the totals
    total = sum(p.numel() for p in model.parameters())
    trainable = count_trainable(model)
    covered = sum(r["parameters"] for r in records)
    if total != covered:
        records.append({"group": "backbone", "part": "unused (pooler)", "parameters": total - covered,
                        "trainable parameters": trainable - sum(r["trainable parameters"] for r in records),
                        "trains": "no"})
    records.append({"group": "total", "part": "all", "parameters": total, "trainable parameters": trainable,
                    "trains": f"{trainable / total:.2%}"})
    return pd.DataFrame(records)
