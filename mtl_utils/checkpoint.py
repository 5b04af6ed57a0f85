"""Checkpoints: the heads, the trained part of the backbone, label names and configuration, as safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from .backbone import load_backbone
from .model import MultiTaskModel
from .offline.cache import atomic_dir, fingerprint, is_complete

FORMAT = "mtl_utils.checkpoint/1"
WEIGHTS, CONFIG = "weights.safetensors", "config.json"


def _untuned_fingerprint(backbone: SentenceTransformer, tuned: set[str]) -> str:
    """Fingerprint of the backbone weights a checkpoint does not store: they must match on load."""
    return fingerprint([(n, p) for n, p in backbone.named_parameters() if n not in tuned])


def save_checkpoint(model: MultiTaskModel, folder: str | Path) -> Path:
    """Write the model's heads, trained backbone weights and configuration to `folder`, atomically."""
    tuned = sorted(model.tuned_backbone)
    backbone = dict(model.backbone.named_parameters())
    tensors = {f"heads.{n}": p for n, p in model.heads.state_dict().items()}
    tensors |= {f"backbone.{n}": backbone[n] for n in tuned}
    config = {
        "format": FORMAT,
        "backbone": model.backbone_name,
        "backbone_fingerprint": _untuned_fingerprint(model.backbone, set(tuned)),
        "embedding_dim": model.embedding_dim,
        "tasks": {t: list(labels) for t, labels in model.label_names.items()},
        "head": model.head_config,
        "tuned_backbone": tuned,
    }
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def read_config(folder: str | Path) -> dict:
    """A checkpoint's configuration, after checking the folder is complete and uncorrupted."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder.name!r} is not a complete checkpoint (missing, partly written or corrupted); "
                         f"save it again with save_checkpoint")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder.name!r} has format {config.get('format')!r}; this version reads {FORMAT!r}")
    return config


def load_into(model: MultiTaskModel, folder: str | Path) -> MultiTaskModel:
    """Load a checkpoint into a model built on the same backbone with the same tasks; refuse anything else."""
    config = read_config(folder)
    tasks = {t: tuple(labels) for t, labels in config["tasks"].items()}
    if tasks != model.label_names:
        raise ValueError(f"checkpoint tasks {tasks} differ from the model's {model.label_names}")
    if config["backbone"] != model.backbone_name:
        raise ValueError(f"checkpoint was trained on backbone {config['backbone']!r}, "
                         f"the model has {model.backbone_name!r}")
    tuned = set(config["tuned_backbone"])
    if _untuned_fingerprint(model.backbone, tuned) != config["backbone_fingerprint"]:
        raise ValueError(f"the model's {model.backbone_name!r} weights differ from the ones the checkpoint was "
                         f"trained on (fingerprint mismatch): load it onto the original pre-trained backbone")
    tensors = load_file(str(Path(folder) / WEIGHTS), device=str(model.device))
    heads = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
    model.heads.load_state_dict(heads, strict=True)
    params = dict(model.backbone.named_parameters())
    with torch.no_grad():
        for name in tuned:
            params[name].copy_(tensors[f"backbone.{name}"])
    model.tuned_backbone |= tuned
    return model


def load_checkpoint(folder: str | Path, backbone: SentenceTransformer | None = None,
                    device: str | torch.device = "cpu") -> MultiTaskModel:
    """Rebuild a MultiTaskModel from a checkpoint, loading its backbone by name unless one is given."""
    config = read_config(folder)
    if backbone is None:
        backbone = load_backbone(config["backbone"], device=device)
    head = config["head"]
    model = MultiTaskModel(backbone, config["tasks"], head=head["kind"], hidden=head["hidden"],
                           dropout=head["dropout"], seed=head["seed"], backbone_name=config["backbone"]).to(device)
    load_into(model, folder)
    return model.eval()
