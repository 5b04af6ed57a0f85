"""LoRA adapters (the peft library) on a MultiTaskModel's backbone: pre-trained weights frozen, low-rank updates train."""

from __future__ import annotations

import re
import warnings

from torch import nn

from . import backbone as bb
from .model import MultiTaskModel

# attention projections LoRA adapts by default (query and value, as in the LoRA paper), per architecture
TARGET_MODULES = {"bert": ("query", "value"), "mpnet": ("q", "v")}


def default_targets(model: MultiTaskModel) -> tuple[str, ...]:
    """The query/value projection names of the backbone's architecture; a clear error for an unknown one."""
    kind = bb.architecture(model.backbone)
    if kind not in TARGET_MODULES:
        raise ValueError(f"no default LoRA target modules for architecture {kind!r} (known: "
                         f"{', '.join(TARGET_MODULES)}); pass target_modules=, e.g. the names of its query/value Linears")
    return TARGET_MODULES[kind]


def has_lora(model: MultiTaskModel) -> bool:
    """True if LoRA adapters were injected into the backbone."""
    return bool(lora_parameters(model))


def add_lora(model: MultiTaskModel, r: int = 8, alpha: int = 16, dropout: float = 0.1,
             target_modules: tuple[str, ...] | None = None, top_layers: int | None = None) -> MultiTaskModel:
    """Inject LoRA adapters into the backbone in place: only they (and the heads, as they were) train.

    Every pre-trained backbone weight is frozen; each adapted Linear W gets W x + (alpha / r) B A x with A random
    and B zero, so the model's outputs are unchanged until the adapters train. With `top_layers`, only the
    top that many transformer layers get adapters: the layers below stay frozen and can be cached.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("this model's backbone already has LoRA adapters")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")
    targets = list(target_modules or default_targets(model))
    auto = bb.transformer(model.backbone)
    present = {name.rsplit(".", 1)[-1] for name, m in auto.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"target modules {missing} are not Linear layers of this backbone; some that are: "
                         f"{', '.join(sorted(present)[:12])}")
    total = len(bb.layers(model.backbone))
    if top_layers is not None and (isinstance(top_layers, bool) or not isinstance(top_layers, int)
                                   or not 1 <= top_layers <= total):
        raise ValueError(f"top_layers must be an integer from 1 to {total} (the backbone's transformer layers), "
                         f"got {top_layers!r}")
    where = {} if top_layers is None else {"layers_to_transform": list(range(total - top_layers, total)),
                                           "layers_pattern": "layer"}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", **where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the model type are not the reader's business
        inject_adapter_in_model(config, auto)
    model.backbone.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)
    return model.train(model.training)  # the stages without adapters (the embeddings) back to eval mode


def lora_parameters(model: MultiTaskModel) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (lora_A / lora_B of each adapted Linear)."""
    return {name: p for name, p in model.backbone.named_parameters() if "lora_" in name}


def _adapted_linears(model: MultiTaskModel) -> dict[str, nn.Module]:
    """The backbone transformer's Linear layers that carry LoRA adapters, by name inside the transformer."""
    return {name: m for name, m in bb.transformer(model.backbone).named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}


def _would_adapt(model: MultiTaskModel, targets: list[str], top_layers: int | None) -> set[str]:
    """The Linear layers add_lora(target_modules=targets, top_layers=top_layers) puts adapters in."""
    total = len(bb.layers(model.backbone))
    found = set()
    for name, m in bb.transformer(model.backbone).named_modules():
        layer = re.search(r"(?:^|\.)layer\.(\d+)\.", name)
        if ".base_layer" in name or name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(m, nn.Linear) or "lora_A" in dict(m.named_children()):
            if top_layers is None or (layer and int(layer[1]) >= total - top_layers):
                found.add(name)
    return found


def lora_settings(model: MultiTaskModel) -> dict | None:
    """The adapters' settings as add_lora takes them (r, alpha, dropout, target_modules, top_layers), read from
    the adapted layers themselves; None without adapters. Raises if add_lora could not make them again."""
    adapted = _adapted_linears(model)
    if not adapted:
        return None
    seen = set()
    for name, m in adapted.items():
        if list(m.lora_A) != ["default"]:
            raise ValueError(f"{name} has adapters {list(m.lora_A)}; add_lora makes one adapter named 'default'")
        dropout = m.lora_dropout["default"]
        r, alpha = m.r["default"], m.lora_alpha["default"]
        if m.use_dora.get("default") or abs(m.scaling["default"] - alpha / r) > 1e-12:
            raise ValueError(f"{name}'s adapter is not plain LoRA with scaling alpha / r (DoRA, rsLoRA or a changed "
                             "scaling); add_lora cannot make it again")
        seen.add((r, alpha, float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0))
    if len(seen) != 1:
        raise ValueError(f"the adapters differ in rank, alpha or dropout ({sorted(seen)}); add_lora makes them "
                         "all alike")
    (r, alpha, dropout), = seen
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    total = len(bb.layers(model.backbone))
    layers = {int(found[1]) for name in adapted if (found := re.search(r"(?:^|\.)layer\.(\d+)\.", name))}
    top_layers = None if not layers or min(layers) == 0 else total - min(layers)
    settings = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets, "top_layers": top_layers}
    if _would_adapt(model, targets, top_layers) != set(adapted):
        raise ValueError(f"the adapted layers ({', '.join(sorted(adapted))}) are not the ones add_lora(**{settings}) "
                         "makes; they cannot be described by add_lora's settings")
    return settings
