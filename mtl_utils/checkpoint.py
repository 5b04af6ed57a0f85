"""Checkpoints: the heads, every backbone weight that differs from the pre-trained one, LoRA adapters with their
settings, label names and configuration, as safetensors + JSON, written atomically.

Which backbone weights are saved is decided by comparison, not by bookkeeping: each weight's digest is compared
with the pre-trained weights the backbone was loaded from, so a change made outside `train()` is saved too. The
weights that are not saved are recorded by digest, and loading refuses a backbone whose weights differ from them.
LoRA adapters are saved as they are, with the settings `add_lora` made them with; loading makes them again with
those settings (never with another rank or alpha), so predictions come back exactly.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from torch import nn

from . import backbone as bb
from .lora import add_lora, lora_parameters, lora_settings
from .model import MultiTaskModel
from .offline.cache import COMPLETE_MARKER, atomic_dir, fingerprint, read_complete, tensor_digest
from .recipes import HEAD_KINDS

FORMAT = "mtl_utils.checkpoint/2"
FORMAT_1 = "mtl_utils.checkpoint/1"  # heads and trained backbone weights; still read
WEIGHTS, CONFIG = "weights.safetensors", "config.json"
FILES = frozenset({WEIGHTS, CONFIG, COMPLETE_MARKER})  # everything a checkpoint folder holds


class CheckpointError(ValueError):
    """A folder that is not a complete, valid checkpoint, or a checkpoint that does not fit the model."""


# --- backbone weights by the names they have without adapters ----------------------------------------------

def _canonical(name: str) -> str:
    """A backbone weight's name as it is without LoRA (peft renames an adapted `q.weight` to `q.base_layer.weight`)."""
    return name.replace(".base_layer.", ".")


def backbone_weights(backbone: SentenceTransformer) -> dict[str, nn.Parameter]:
    """The backbone's own parameters, LoRA adapters left out, by the names they have without adapters."""
    return {_canonical(n): p for n, p in backbone.named_parameters() if "lora_" not in n}


@functools.lru_cache(maxsize=8)
def _file_digests(files: tuple[tuple[str, int, int], ...]) -> dict[str, str]:
    """Digest of every tensor in some safetensors files, given as (path, size, mtime): read once per process."""
    digests = {}
    for path, _, _ in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                digests[key] = tensor_digest(f.get_tensor(key))
    return digests


def _weight_files(source: str) -> list[Path]:
    """The safetensors files a transformer was loaded from: a local folder's, or a hub download's (from the local
    hub cache, never the network)."""
    if not source:
        return []
    if Path(source).is_dir():
        return sorted(Path(source).glob("*.safetensors"))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model.safetensors")
    except (ValueError, OSError):  # not a hub id
        return []
    return [Path(cached)] if isinstance(cached, str) else []


def pretrained_digests(backbone: SentenceTransformer) -> dict[str, str]:
    """Digests of the pre-trained weights the backbone was loaded from, by backbone weight name.

    Empty where those files are unknown, gone, or not safetensors: then every weight counts as changed.
    """
    auto = bb.transformer(backbone)
    found = _weight_files(str(getattr(auto.config, "_name_or_path", "") or ""))
    if not found:
        return {}
    files = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in found)
    try:
        in_files = _file_digests(files)
    except (OSError, SafetensorError):
        return {}
    inside = {id(p): _canonical(n) for n, p in auto.named_parameters() if "lora_" not in n}
    prefix = getattr(auto, "base_model_prefix", "")
    digests = {}
    for name, param in backbone_weights(backbone).items():
        key = inside.get(id(param))
        if key is None:
            continue  # a module after the transformer (a Dense layer): no reference here, so always saved
        digest = in_files.get(key) or in_files.get(f"{prefix}.{key}")
        if digest is not None:
            digests[name] = digest
    return digests


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
        raise FileExistsError(f"{str(folder)!r} exists and is not a folder; save_checkpoint replaces only a "
                              "checkpoint or an empty folder: choose another path")
    names = sorted(os.listdir(folder))
    if not names or (set(names) <= FILES and (COMPLETE_MARKER in names or _our_config(folder))):
        return
    foreign = [n for n in names if n not in FILES] or names
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise FileExistsError(f"{str(folder)!r} holds files that are not part of a checkpoint ({', '.join(foreign[:5])}"
                          f"{more}); save_checkpoint replaces only a checkpoint or an empty folder: save into a new "
                          "folder, or move those files away first")


def save_checkpoint(model: MultiTaskModel, folder: str | Path) -> Path:
    """Write the model's heads, changed backbone weights, LoRA adapters and configuration to `folder`, atomically.

    `folder` may be missing, empty, or a checkpoint (replaced in one step); anything else is refused.
    """
    folder = Path(folder)
    check_replaceable(folder)
    lora = lora_settings(model)  # refuses adapters that add_lora could not make again
    weights = backbone_weights(model.backbone)
    tuned = {_canonical(n) for n in model.tuned_backbone if "lora_" not in n} & weights.keys()
    digests = {n: tensor_digest(p) for n, p in weights.items() if n not in tuned}
    pretrained = pretrained_digests(model.backbone)
    changed = {n for n, d in digests.items() if pretrained.get(n) != d}
    stored = [n for n in weights if n in tuned or n in changed]
    tensors = {f"heads.{n}": p for n, p in model.heads.state_dict().items()}
    tensors |= {f"backbone.{n}": weights[n] for n in stored}
    tensors |= {f"lora.{n}": p for n, p in lora_parameters(model).items()}
    config = {
        "format": FORMAT,
        "backbone": model.backbone_name,
        "embedding_dim": model.embedding_dim,
        "tasks": {t: list(labels) for t, labels in model.label_names.items()},
        "head": model.head_config,
        "lora": lora,
        "tuned_backbone": stored,  # saved backbone weights: trained, or changed in any other way
        "backbone_digests": {n: d for n, d in digests.items() if n not in changed},  # the rest: checked on load
    }
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


# --- reading ------------------------------------------------------------------------------------------------

def _invalid(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{folder.name!r} is not a complete checkpoint: {what}; save it again with save_checkpoint")


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
    if config.get("format") not in (FORMAT, FORMAT_1):
        raise _invalid(folder, f"{CONFIG} has format {config.get('format')!r}; this version reads {FORMAT!r} "
                               f"and {FORMAT_1!r}")
    head, tasks, lora = config.get("head"), config.get("tasks"), config.get("lora")
    checks = {
        "backbone": isinstance(config.get("backbone"), str),
        "tasks": isinstance(tasks, dict) and bool(tasks) and all(_is_str_list(v) for v in tasks.values()),
        "head": isinstance(head, dict) and head.get("kind") in HEAD_KINDS and _is_int(head.get("hidden"))
                and _is_number(head.get("dropout")) and _is_int(head.get("seed")),
        "tuned_backbone": _is_str_list(config.get("tuned_backbone")),
    }
    if config["format"] == FORMAT_1:
        checks["backbone_fingerprint"] = isinstance(config.get("backbone_fingerprint"), str)
    else:
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


def _read(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's configuration and tensors, read together (one version even while a writer replaces it)."""
    if not isinstance(folder, str | os.PathLike) or not str(folder):
        raise TypeError(f"a checkpoint is a folder: give its path (str or Path), got {folder!r}")
    folder = Path(folder)
    files = read_complete(folder)
    if files is None:
        if not os.path.lexists(folder):
            raise CheckpointError(f"there is no checkpoint at {str(folder)!r}; save one there with save_checkpoint")
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
    return _read(folder)[0]


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
    if config["format"] == FORMAT_1:
        differ = fingerprint((n, p) for n, p in weights.items() if n not in stored) != config["backbone_fingerprint"]
        names = "its weights (fingerprint mismatch)" if differ else ""
    else:
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
                              f"{config['backbone']!r} as load_backbone gives it (or let load_checkpoint load it)")


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
                              + " (or use load_checkpoint, which does)")
    heads = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
    _check_shapes(model.heads.state_dict(), heads, "heads")
    saved, current = config.get("lora"), lora_settings(model)
    if current is not None and saved != current:
        raise CheckpointError(f"the model's LoRA adapters ({current}) differ from the checkpoint's ({saved}): load it "
                              "into a model without adapters (they are added with the checkpoint's settings)")
    stored = config["tuned_backbone"]
    _check_backbone(model, config, stored)
    weights = backbone_weights(model.backbone)
    _check_shapes({n: weights[n] for n in stored},
                  {n: tensors[f"backbone.{n}"] for n in stored if f"backbone.{n}" in tensors}, "backbone weights")


def _apply(model: MultiTaskModel, config: dict, tensors: dict[str, torch.Tensor]) -> MultiTaskModel:
    """Check that the checkpoint fits, then load it into `model` (adding its LoRA adapters if the model has none)."""
    _check_fit(model, config, tensors)
    saved = config.get("lora")
    adapters = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    if saved is not None and lora_settings(model) is None:
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


def load_into(model: MultiTaskModel, folder: str | Path) -> MultiTaskModel:
    """Load a checkpoint into a model built on the same backbone with the same tasks and heads; refuse anything
    else. A LoRA checkpoint adds its adapters, with its own settings, to a model that has none."""
    config, tensors = _read(folder)
    return _apply(model, config, tensors)


def load_checkpoint(folder: str | Path, backbone: SentenceTransformer | None = None,
                    device: str | torch.device = "cpu") -> MultiTaskModel:
    """Rebuild a MultiTaskModel from a checkpoint, loading its backbone by name unless one is given."""
    config, tensors = _read(folder)
    if backbone is None:
        backbone = bb.load_backbone(config["backbone"], device=device)
    head = config["head"]
    model = MultiTaskModel(backbone, config["tasks"], head=head["kind"], hidden=head["hidden"],
                           dropout=head["dropout"], seed=head["seed"], backbone_name=config["backbone"]).to(device)
    _apply(model, config, tensors)
    return model.eval()
