"""How a MultiTaskModel saves itself (`model.save(folder)`) and loads back (`MultiTaskModel.load(folder)`).

A checkpoint is a folder of two files, written atomically: `config.json` (backbone name, tasks and label names,
head settings, the LoRA settings `add_lora` was given) and `weights.safetensors` (the heads, every backbone weight
that changed since the model was built, the LoRA adapters). The backbone weights that did not change are
recorded by digest: loading refuses a backbone whose weights differ from them, naming which. A damaged or
partly written folder is refused, and saving replaces only a checkpoint or an empty folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from .lora import add_lora, backbone_weights, check_settings, lora_parameters
from .offline.cache import COMPLETE_MARKER, atomic_dir, read_complete, tensor_digest
from .recipes import HEAD_KINDS

if TYPE_CHECKING:
    from .model import MultiTaskModel

FORMAT = "mtl_utils.checkpoint/2"
WEIGHTS, CONFIG = "weights.safetensors", "config.json"
FILES = frozenset({WEIGHTS, CONFIG, COMPLETE_MARKER})  # everything a checkpoint folder holds


class CheckpointError(ValueError):
    """A folder that is not a complete, valid checkpoint, or a checkpoint that does not fit the model."""


# --- saving -------------------------------------------------------------------------------------------------

def _our_config(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("format", "")).startswith("mtl_utils.checkpoint/")


def check_replaceable(folder: str | os.PathLike) -> None:
    """Raise FileExistsError unless `folder` is missing, an empty folder, or a checkpoint (which saving replaces)."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} exists and is not a folder; model.save replaces only a "
                              "checkpoint or an empty folder: choose another path")
    names = sorted(os.listdir(folder))
    if not names or (set(names) <= FILES and (COMPLETE_MARKER in names or _our_config(folder))):
        return
    foreign = [n for n in names if n not in FILES] or names
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise FileExistsError(f"{str(folder)!r} holds files that are not part of a checkpoint ({', '.join(foreign[:5])}"
                          f"{more}); model.save replaces only a checkpoint or an empty folder: save into a new "
                          "folder, or move those files away first")


def write(model: MultiTaskModel, folder: str | Path) -> Path:
    """`model.save(folder)`: the heads, changed backbone weights, LoRA adapters and configuration, atomically.

    `folder` may be missing, empty, or a checkpoint (replaced in one step); anything else is refused.
    """
    folder = Path(folder)
    check_replaceable(folder)
    check_settings(model)  # the adapters are as add_lora made them: loading makes them again from model.lora
    weights = backbone_weights(model.backbone)
    changed = model.changed_backbone()
    stored = [n for n in weights if n in changed]
    tensors = {f"heads.{n}": p for n, p in model.heads.state_dict().items()}
    tensors |= {f"backbone.{n}": weights[n] for n in stored}
    tensors |= {f"lora.{n}": p for n, p in lora_parameters(model).items()}
    config = {
        "format": FORMAT,
        "backbone": model.backbone_name,
        "embedding_dim": model.embedding_dim,
        "tasks": {t: list(labels) for t, labels in model.label_names.items()},
        "head": model.head_config,
        "lora": model.lora,
        "tuned_backbone": stored,  # saved backbone weights: trained, or changed in any other way
        "backbone_digests": {n: tensor_digest(p) for n, p in weights.items() if n not in changed},  # checked on load
    }
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


# --- reading ------------------------------------------------------------------------------------------------

def _invalid(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{folder.name!r} is not a complete checkpoint: {what}; save it again with model.save")


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: object, folder: Path) -> dict:
    """The configuration if it has every field this version needs, with the right types; else a clear error."""
    if not isinstance(config, dict):
        raise _invalid(folder, f"{CONFIG} holds a JSON {type(config).__name__}, not an object")
    if config.get("format") != FORMAT:
        raise _invalid(folder, f"{CONFIG} has format {config.get('format')!r}; this version reads {FORMAT!r}")
    head, tasks, lora = config.get("head"), config.get("tasks"), config.get("lora")
    checks = {
        "backbone": isinstance(config.get("backbone"), str),
        "tasks": isinstance(tasks, dict) and bool(tasks) and all(_is_str_list(v) for v in tasks.values()),
        "head": isinstance(head, dict) and head.get("kind") in HEAD_KINDS and _is_int(head.get("hidden"))
                and _is_number(head.get("dropout")) and _is_int(head.get("seed")),
        "tuned_backbone": _is_str_list(config.get("tuned_backbone")),
    }
    digests = config.get("backbone_digests")
    checks["backbone_digests"] = isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
    checks["lora"] = lora is None or (
        isinstance(lora, dict) and _is_int(lora.get("r")) and _is_number(lora.get("alpha"))
        and _is_number(lora.get("dropout")) and _is_str_list(lora.get("target_modules"))
        and (lora.get("top_layers") is None or _is_int(lora.get("top_layers"))))
    bad = [field for field, ok in checks.items() if not ok]
    if bad:
        raise _invalid(folder, f"{CONFIG} lacks or has a malformed {', '.join(bad)}")
    return config


def read(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's configuration and tensors, read together (one version even while a writer replaces it)."""
    if not isinstance(folder, str | os.PathLike) or not str(folder):
        raise TypeError(f"a checkpoint is a folder: give its path (str or Path), got {folder!r}")
    folder = Path(folder)
    files = read_complete(folder)
    if files is None:
        if not os.path.lexists(folder):
            raise CheckpointError(f"there is no checkpoint at {str(folder)!r}; save one there with model.save")
        raise _invalid(folder, "missing, partly written or corrupted files")
    if CONFIG not in files or WEIGHTS not in files:
        raise _invalid(folder, f"it has no {CONFIG if CONFIG not in files else WEIGHTS}")
    try:
        config = json.loads(files[CONFIG])
    except ValueError as exc:
        raise _invalid(folder, f"{CONFIG} is not JSON ({exc})") from None
    config = _check_config(config, folder)
    try:
        tensors = load_bytes(files[WEIGHTS])
    except (SafetensorError, ValueError) as exc:
        raise _invalid(folder, f"{WEIGHTS} cannot be read ({exc})") from None
    return config, tensors


def read_config(folder: str | Path) -> dict:
    """A checkpoint's configuration, after checking the folder is complete and uncorrupted."""
    return read(folder)[0]


# --- loading into a model -----------------------------------------------------------------------------------

def _check_shapes(have: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(have.keys() - given.keys()), sorted(given.keys() - have.keys())
    if missing or extra:
        raise CheckpointError(f"the checkpoint's {what} do not fit the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    wrong = [n for n in have if tuple(have[n].shape) != tuple(given[n].shape)]
    if wrong:
        n = wrong[0]
        raise CheckpointError(f"the checkpoint's {what} do not fit the model: {n} has shape "
                              f"{tuple(given[n].shape)} in the checkpoint, {tuple(have[n].shape)} in the model")


def _check_backbone(model: MultiTaskModel, config: dict, stored: list[str]) -> None:
    """Refuse a backbone whose weights the checkpoint does not store differ from the ones it was saved with."""
    weights = backbone_weights(model.backbone)
    unknown = [n for n in stored if n not in weights]
    expected = config["backbone_digests"]
    unknown += [n for n in expected if n not in weights]
    wrong = [n for n, d in expected.items() if n in weights and tensor_digest(weights[n]) != d]
    names = (f"{len(wrong)} of its weights ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}; "
             "fingerprint mismatch)") if wrong else ""
    if unknown:
        raise CheckpointError(f"the model's backbone has no weights named {', '.join(unknown[:3])}: the checkpoint "
                              f"was saved on another architecture ({config['backbone']!r})")
    if names:
        raise CheckpointError(f"the model's {model.backbone_name!r} backbone differs from the one the checkpoint was "
                              f"saved from in {names}, which the checkpoint does not store: load it onto the backbone "
                              f"{config['backbone']!r} as load_backbone gives it (or let MultiTaskModel.load load it)")


def same_backbone(a: str, b: str) -> bool:
    """Two backbone names mean the same backbone: equal, or one local folder written two ways."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def _check_fit(model: MultiTaskModel, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every reason the checkpoint cannot go into `model`, as one clear error, before anything is changed."""
    tasks = {t: tuple(labels) for t, labels in config["tasks"].items()}
    if tasks != model.label_names:
        raise CheckpointError(f"checkpoint tasks {tasks} differ from the model's {model.label_names}")
    if not same_backbone(config["backbone"], model.backbone_name):
        raise CheckpointError(f"checkpoint was trained on backbone {config['backbone']!r}, "
                              f"the model has {model.backbone_name!r}")
    ours, theirs = model.head_config, config["head"]
    if (ours["kind"], ours["hidden"] if ours["kind"] == "mlp" else None) != \
            (theirs["kind"], theirs["hidden"] if theirs["kind"] == "mlp" else None):
        def kind(h: dict) -> str:
            return f"{h['kind']!r}" + (f" (hidden {h['hidden']})" if h["kind"] == "mlp" else "")
        raise CheckpointError(f"the checkpoint's heads are {kind(theirs)}, the model's are {kind(ours)}: build the "
                              f"model with head={theirs['kind']!r}"
                              + (f", hidden={theirs['hidden']}" if theirs["kind"] == "mlp" else "")
                              + " (or use MultiTaskModel.load, which does)")
    heads = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
    _check_shapes(model.heads.state_dict(), heads, "heads")
    saved, current = config.get("lora"), model.lora
    if current is not None and saved != current:
        raise CheckpointError(f"the model's LoRA adapters ({current}) differ from the checkpoint's ({saved}): load it "
                              "into a model without adapters (they are added with the checkpoint's settings)")
    stored = config["tuned_backbone"]
    _check_backbone(model, config, stored)
    weights = backbone_weights(model.backbone)
    _check_shapes({n: weights[n] for n in stored},
                  {n: tensors[f"backbone.{n}"] for n in stored if f"backbone.{n}" in tensors}, "backbone weights")


def apply(model: MultiTaskModel, config: dict, tensors: dict[str, torch.Tensor]) -> MultiTaskModel:
    """Check that the checkpoint fits, then load it into `model` (adding its LoRA adapters if the model has none)."""
    _check_fit(model, config, tensors)
    saved = config.get("lora")
    adapters = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    if saved is not None and model.lora is None:
        add_lora(model, **saved)
    _check_shapes(lora_parameters(model), adapters, "LoRA adapters")
    heads = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
    model.heads.load_state_dict(heads, strict=True)
    weights = backbone_weights(model.backbone)
    live = {id(p): n for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for name in config["tuned_backbone"]:
            weights[name].copy_(tensors[f"backbone.{name}"])
            model.tuned_backbone.add(live[id(weights[name])])
        for name, param in lora_parameters(model).items():
            param.copy_(adapters[name])
            model.tuned_backbone.add(name)
    return model
