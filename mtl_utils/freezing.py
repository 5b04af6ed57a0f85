"""Freezing, in words a reader recognises: the whole network, only the backbone, one head, nothing, or all but the last k layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from torch import nn

if TYPE_CHECKING:
    from .model import MultiTaskModel

SCENARIOS = {
    "everything": "the whole network is frozen: backbone and every head (inference only)",
    "backbone": "only the backbone is frozen: every head trains on fixed sentence embeddings",
    "head": "one named head is frozen: the backbone and the other heads train",
    "nothing": "nothing is frozen: backbone and heads all train",
}


def backbone_stages(model: MultiTaskModel) -> list[tuple[str, list[nn.Module]]]:
    """The backbone cut into stages from the bottom: embeddings, then each transformer layer.

    Parameters outside the layers (e.g. MPNet's relative attention bias) belong to the embeddings
    stage; the BERT pooler is left out because mean pooling never uses it.
    """
    auto = model.backbone[0].auto_model
    layers = auto.encoder.layer
    shared = [m for name, m in auto.encoder.named_children() if name != "layer"]
    stages = [("embeddings", [auto.embeddings, *shared])]
    stages += [(f"layer {i}", [layer]) for i, layer in enumerate(layers)]
    return stages


def num_layers(model: MultiTaskModel) -> int:
    """Number of transformer layers in the backbone."""
    return len(model.backbone[0].auto_model.encoder.layer)


def _set(modules: list[nn.Module] | nn.Module, trainable: bool) -> None:
    for module in modules if isinstance(modules, list) else [modules]:
        module.requires_grad_(trainable)


def _trains(modules: list[nn.Module] | nn.Module) -> bool | None:
    """True if every parameter trains, False if none does, None if some do."""
    flags = {p.requires_grad for m in (modules if isinstance(modules, list) else [modules]) for p in m.parameters()}
    return flags.pop() if len(flags) == 1 else (None if flags else False)


def _check_head(model: MultiTaskModel, head: str | None) -> str:
    if head not in model.heads:
        raise ValueError(f"unknown head {head!r}; this model's heads are: {', '.join(model.heads)}")
    return head


def freeze(model: MultiTaskModel, scenario: str, head: str | None = None) -> MultiTaskModel:
    """Apply a freeze scenario ('everything', 'backbone', 'head' with `head=`, 'nothing'); returns the model."""
    if scenario not in SCENARIOS:
        known = "; ".join(f"{k!r}: {v}" for k, v in SCENARIOS.items())
        raise ValueError(f"unknown freeze scenario {scenario!r}; known scenarios are {known}")
    if scenario == "head":
        head = _check_head(model, head)
    elif head is not None:
        raise ValueError(f"`head=` only goes with scenario 'head', not {scenario!r}")
    model.requires_grad_(scenario in ("head", "nothing"))
    if scenario == "backbone":
        model.heads.requires_grad_(True)
    if scenario == "head":
        model.heads[head].requires_grad_(False)
    _freeze_pooler(model)
    model.train(model.training)
    return model


def freeze_head(model: MultiTaskModel, head: str, frozen: bool = True) -> MultiTaskModel:
    """Freeze (or unfreeze) one named head, leaving everything else as it is."""
    model.heads[_check_head(model, head)].requires_grad_(not frozen)
    model.train(model.training)
    return model


def unfreeze_last_layers(model: MultiTaskModel, k: int, embeddings: bool = False) -> MultiTaskModel:
    """Make exactly the last `k` transformer layers of the backbone train (and the embeddings if asked).

    The heads are left as they are, so `freeze(model, "backbone")` then `unfreeze_last_layers(model, 2)`
    reads like the plan: heads and the top two layers train, the rest stays pre-trained.
    """
    total = num_layers(model)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer from 0 to {total} (the backbone {model.backbone_name!r} has {total} "
                         f"transformer layers); got {k!r}")
    stages = backbone_stages(model)
    _set(stages[0][1], embeddings)
    for i, (_, modules) in enumerate(stages[1:]):
        _set(modules, i >= total - k)
    _freeze_pooler(model)
    model.train(model.training)
    return model


def _freeze_pooler(model: MultiTaskModel) -> None:
    # The BERT pooler is never used by mean pooling, so it can never receive a gradient.
    pooler = getattr(model.backbone[0].auto_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should see: only those that train."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """How many parameter values the optimizer sees (the sum over `trainable_parameters`)."""
    return sum(p.numel() for p in trainable_parameters(model))


def frozen_prefix_depth(model: MultiTaskModel) -> int:
    """How many bottom stages are entirely frozen: 0 = embeddings train, 1 + j = embeddings and j layers frozen."""
    depth = 0
    for _, modules in backbone_stages(model):
        if any(p.requires_grad for m in modules for p in m.parameters()):
            break
        depth += 1
    return depth


def backbone_frozen(model: MultiTaskModel) -> bool:
    """True if no backbone parameter trains (so its sentence embeddings never change)."""
    return not any(p.requires_grad for p in model.backbone.parameters())


def frozen_modules(model: MultiTaskModel) -> list[nn.Module]:
    """Every stage or head whose parameters are all frozen: these stay in eval mode (dropout off)."""
    parts = [modules for _, modules in backbone_stages(model)] + [[h] for h in model.heads.values()]
    if backbone_frozen(model):
        parts.append([model.backbone])
    return [m for modules in parts if _trains(modules) is False for m in modules]


def trainable_summary(model: MultiTaskModel) -> pd.DataFrame:
    """One row per part (embeddings, each layer, each head) with its parameter count and whether it trains, plus totals."""
    rows = []
    for name, modules in backbone_stages(model):
        rows.append(("backbone", name, modules))
    for name, head in model.heads.items():
        rows.append(("head", name, [head]))
    records = []
    for group, name, modules in rows:
        params = [p for m in modules for p in m.parameters()]
        trains = _trains(modules)
        records.append({
            "group": group,
            "part": name,
            "parameters": sum(p.numel() for p in params),
            "trainable parameters": sum(p.numel() for p in params if p.requires_grad),
            "trains": {True: "yes", False: "no", None: "partly"}[trains],
        })
    table = pd.DataFrame(records)
    # parameters in no stage (e.g. the unused pooler) still count in the totals
    total = sum(p.numel() for p in model.parameters())
    trainable = count_trainable(model)
    covered = int(table["parameters"].sum())
    if total != covered:
        records.append({"group": "backbone", "part": "unused (pooler)", "parameters": total - covered,
                        "trainable parameters": trainable - int(table["trainable parameters"].sum()), "trains": "no"})
    records.append({"group": "total", "part": "all", "parameters": total, "trainable parameters": trainable,
                    "trains": f"{trainable / total:.2%}"})
    return pd.DataFrame(records)
