"""LoRA adapters (the peft library) on a MultiTaskModel's backbone: pre-trained weights frozen, low-rank updates train."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from sentence_transformers import SentenceTransformer
from torch import nn

from . import backbone as bb

if TYPE_CHECKING:
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
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": sorted(targets),
                  "top_layers": top_layers}  # what a checkpoint stores: loading calls add_lora with exactly these
    model.backbone.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)
    return model.train(model.training)  # the stages without adapters (the embeddings) back to eval mode


def lora_parameters(model: MultiTaskModel) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (lora_A / lora_B of each adapted Linear)."""
    return {name: p for name, p in model.backbone.named_parameters() if "lora_" in name}


def plain_name(name: str) -> str:
    """A backbone weight's name as it is without adapters (peft renames an adapted `q.weight` to
    `q.base_layer.weight`)."""
    return name.replace(".base_layer.", ".")


def backbone_weights(backbone: SentenceTransformer) -> dict[str, nn.Parameter]:
    """The backbone's own parameters, adapters left out, by the names they have without adapters."""
    return {plain_name(n): p for n, p in backbone.named_parameters() if "lora_" not in n}


def check_settings(model: MultiTaskModel) -> None:
    """Raise unless every adapter is as `add_lora` made it with `model.lora` (no rank, alpha or scaling changed
    by hand since): a checkpoint stores those settings, and loading makes the adapters again from them."""
    for name, module in bb.transformer(model.backbone).named_modules():
        if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        settings = model.lora or {}
        r, alpha = module.r.get("default"), module.lora_alpha.get("default")
        if list(module.lora_A) != ["default"] or (r, alpha) != (settings.get("r"), settings.get("alpha")) \
                or abs(module.scaling["default"] - alpha / r) > 1e-12 or module.use_dora.get("default"):
            raise ValueError(f"{name}'s adapter (r={r}, alpha={alpha}) is not what add_lora made with {settings}; "
                             "add_lora cannot make it again, so it cannot be saved")
