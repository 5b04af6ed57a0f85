"""LoRA adapters (the peft library) on a MultiTaskModel's backbone: pre-trained weights frozen, low-rank updates train."""

from __future__ import annotations

import warnings

from torch import nn

from .model import MultiTaskModel

# attention projections LoRA adapts by default (query and value, as in the LoRA paper), per architecture
TARGET_MODULES = {"bert": ("query", "value"), "mpnet": ("q", "v")}


def default_targets(model: MultiTaskModel) -> tuple[str, ...]:
    """The query/value projection names of the backbone's architecture; a clear error for an unknown one."""
    kind = getattr(model.backbone[0].auto_model.config, "model_type", None)
    if kind not in TARGET_MODULES:
        raise ValueError(f"no default LoRA target modules for architecture {kind!r} (known: "
                         f"{', '.join(TARGET_MODULES)}); pass target_modules=, e.g. the names of its query/value Linears")
    return TARGET_MODULES[kind]


def has_lora(model: MultiTaskModel) -> bool:
    """True if LoRA adapters were injected into the backbone."""
    return bool(lora_parameters(model))


def add_lora(model: MultiTaskModel, r: int = 8, alpha: int = 16, dropout: float = 0.1,
             target_modules: tuple[str, ...] | None = None) -> MultiTaskModel:
    """Inject LoRA adapters into the backbone in place: only they (and the heads, as they were) train.

    Every pre-trained backbone weight is frozen; each adapted Linear W gets W x + (alpha / r) B A x with A random
    and B zero, so the model's outputs are unchanged until the adapters train.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("this model's backbone already has LoRA adapters")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")
    targets = list(target_modules or default_targets(model))
    auto = model.backbone[0].auto_model
    present = {name.rsplit(".", 1)[-1] for name, m in auto.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"target modules {missing} are not Linear layers of this backbone; some that are: "
                         f"{', '.join(sorted(present)[:12])}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the model type are not the reader's business
        inject_adapter_in_model(config, auto)
    model.backbone.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)
    model.train(model.training)  # frozen stages back to eval mode
    return model


def lora_parameters(model: MultiTaskModel) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (lora_A / lora_B of each adapted Linear)."""
    return {name: p for name, p in model.backbone.named_parameters() if "lora_" in name}
