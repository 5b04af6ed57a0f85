"""Deployment: a frozen MultiTaskModel as ONE ONNX graph, its int8 twin, and an onnxruntime model with `predict`.

The graph takes the tokenizer's arrays (input_ids, attention_mask, ...; batch and sequence axes dynamic) and
runs the backbone's own module pipeline (transformer -> pooling [-> normalisation, only where the backbone has
it]) and then every head: one named logits output per task. `OnnxModel.predict(texts)` gives the same DataFrame
as `MultiTaskModel.predict`, through the same batched loop (`model.map_batches`) and table
(`model.probability_table`), tokenising with the tokenizer saved next to the graph, so an export folder
serves without the PyTorch model.

    export_checkpoint("runs/heads/checkpoint", "deploy/heads")   # model.onnx, model.int8.onnx, tokenizer/
    OnnxModel.load("deploy/heads").predict(["How far is the moon?"])
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import backbone as bb
from .data import check_texts
from .model import MultiTaskModel, eval_mode, map_batches, probability_table
from .offline.cache import atomic_dir, atomic_path, is_complete

FORMAT = "mtl_utils.export/1"
FP32, INT8, CONFIG, TOKENIZER = "model.onnx", "model.int8.onnx", "export.json", "tokenizer"
METADATA_KEY = "mtl_utils"  # the ONNX file's own metadata: tasks, labels, inputs, outputs (it describes itself)
DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 14, 20  # 17: one LayerNormalization op; 20: the TorchScript exporter's last
# PyTorch vs onnxruntime fp32 logits, largest difference measured: 2e-6 for notebook 02's trained heads on
# all-MiniLM-L6-v2, under 3e-7 for random heads on each offline backbone and the tiny test one. The tolerance
# leaves room for other CPUs' kernels and is far below what a wrong graph gives (leaving out all-MiniLM-L6-v2's
# normalisation moves random heads' logits by 0.4).
FP32_ATOL = 1e-4
# Tracing example: two texts of different lengths, so the traced graph pads and applies the attention mask.
_EXAMPLE = ["a", "a longer example sentence, so the batch has padding and the attention mask is traced"]
_PROBES = ["How far is it from Denver to Aspen?", "What is the capital of Mongolia?",
           "A gorgeous, witty, seductive movie.", "The plot is nothing but boilerplate clichés from start to end.",
           "Who wrote the book?", " ".join(["a very long and repetitive sentence that goes beyond the limit"] * 60)]


# --- export -------------------------------------------------------------------------------------------------

class _Graph(nn.Module):
    """What the ONNX file computes: tokenised arrays -> the backbone's modules -> every head's logits."""

    def __init__(self, model: MultiTaskModel, input_names: Sequence[str]) -> None:
        super().__init__()
        self.backbone, self.heads, self.input_names = model.backbone, model.heads, list(input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeddings = self.backbone(dict(zip(self.input_names, inputs)))["sentence_embedding"]
        return tuple(head(embeddings) for head in self.heads.values())


def output_name(task: str) -> str:
    """The graph's output holding one task's logits."""
    return f"logits.{task}"


def _tokenizer_arrays(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenise as the SentenceTransformer does: pad to the longest, truncate at max_seq_length, int64 arrays."""
    encoded = tokenizer(list(texts), padding=True, truncation="longest_first", max_length=max_length,
                        return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()}


def _metadata(model: MultiTaskModel, input_names: Sequence[str]) -> dict:
    return {"format": FORMAT, "backbone": model.backbone_name, "max_seq_length": int(model.backbone.max_seq_length),
            "inputs": list(input_names), "outputs": {t: output_name(t) for t in model.tasks},
            "tasks": {t: list(labels) for t, labels in model.label_names.items()}}


def _with_metadata(proto, metadata: Mapping):
    """The ONNX model with our metadata (replacing an earlier copy)."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))  # dict order = head order
    return proto


def _set_metadata(path: Path, metadata: Mapping) -> None:
    """Write our metadata into an ONNX file, atomically."""
    import onnx

    proto = _with_metadata(onnx.load(str(path)), metadata)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def _check_metadata(found: Mapping[str, str], name: str) -> dict:
    if METADATA_KEY not in found:
        raise ValueError(f"{name!r} is an ONNX file but not one mtl_utils.export wrote (no {METADATA_KEY!r} "
                         "metadata); export the model with export_onnx")
    metadata = json.loads(found[METADATA_KEY])
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{name!r} has format {metadata.get('format')!r}; this version reads {FORMAT!r}")
    return metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The tasks, labels, inputs and outputs an exported ONNX file carries; a clear error for any other file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path.name!r} is not a readable ONNX file ({exc})") from exc
    return _check_metadata({p.key: p.value for p in proto.metadata_props}, path.name)


def export_onnx(model: MultiTaskModel, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (in eval mode, as it is now) as one ONNX graph: tokenised input -> every task's logits.

    Inputs are what the backbone's tokenizer gives (input_ids, attention_mask, and token_type_ids for BERT);
    outputs are `logits.<task>`, one per head; batch and sequence axes are dynamic. Uses PyTorch's
    TorchScript exporter (`dynamo=False`): the torch.export one needs onnxscript, which we do not install.
    """
    if not isinstance(model, MultiTaskModel):
        raise TypeError(f"export_onnx exports a MultiTaskModel, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the exported file's name must end in .onnx, got {path.name!r}")
    features = model.features(_EXAMPLE)
    names = [k for k, v in features.items() if isinstance(v, torch.Tensor)]
    if "attention_mask" not in names or bool(features["attention_mask"].all()):
        raise ValueError("the backbone's tokenizer gives no attention mask with padding; export_onnx traces "
                         "padded batches and cannot export this backbone")
    outputs = [output_name(t) for t in model.tasks]
    axes = {**{n: {0: "batch", 1: "sequence"} for n in names}, **{o: {0: "batch"} for o in outputs}}
    graph = _Graph(model, names)
    buffer = io.BytesIO()
    with torch.no_grad(), eval_mode(model), warnings.catch_warnings():
        # The tracer warns where Python decides on a tensor (mask shape checks, SDPA's is_causal): each takes
        # the same branch for every padded batch, which the dynamic-axes tests check. The TorchScript exporter
        # is deprecated in favour of one that needs onnxscript.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing", category=UserWarning)
        torch.onnx.export(graph, tuple(features[n] for n in names), buffer, dynamo=False, input_names=names,
                          output_names=outputs, dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    import onnx

    proto = _with_metadata(onnx.load_from_string(buffer.getvalue()), _metadata(model, names))
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


# Dynamic int8 quantisation, chosen by measurement (report of issue 17): the backbone's MatMuls (its linear
# layers) and Gathers (the word-embedding table, half of a MiniLM's weights: without it the file is only 1.6x
# smaller) get int8 weights, one scale per output channel (per tensor flipped 2-3x more labels); the heads stay
# fp32. A head is a Gemm (a linear layer on a batch of vectors), the backbone's layers MatMuls (on a batch of
# token sequences): naming the nodes that are MatMul or Gather in the exported graph keeps the heads out, which
# op types alone would not (onnxruntime turns each Gemm into a MatMul before it quantises).
QUANTIZED_OPS = ("MatMul", "Gather")


@contextlib.contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Drop onnxruntime's "consider pre-processing" warning, without the root-logger handler it would install.

    We skip its pre-processing: its symbolic shape inference fails on this graph, and its optimisations are
    the ones an ORT_ENABLE_ALL session makes itself.
    """
    root = logging.getLogger()
    quiet = logging.NullHandler()  # a handler, so logging.warning does not call basicConfig
    hint = logging.Filter()
    hint.filter = lambda record: "pre-processing before quantization" not in record.getMessage()
    root.addHandler(quiet)
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
        root.removeHandler(quiet)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = True,
                  op_types: Sequence[str] = QUANTIZED_OPS) -> Path:
    """Dynamic int8 quantisation of an exported graph's backbone with onnxruntime's tools (int8 weights,
    activations quantised on the fly, heads left in fp32); the metadata travels along."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    metadata = read_metadata(src)
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize_int8 writes a new file; give a destination other than {src.name!r}")
    if dst.suffix != ".onnx":
        raise ValueError(f"the quantised file's name must end in .onnx, got {dst.name!r}")
    unknown = set(op_types) - set(QUANTIZED_OPS)
    if unknown:
        raise ValueError(f"quantize_int8 quantises {', '.join(QUANTIZED_OPS)} nodes, not {sorted(unknown)}")
    nodes = [n.name for n in onnx.load(str(src)).graph.node if n.op_type in op_types]
    if not nodes:
        raise ValueError(f"{src.name!r} has no {'/'.join(op_types)} nodes to quantise")
    with atomic_path(dst) as tmp, _without_preprocess_hint():
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types), nodes_to_quantize=nodes)
    _set_metadata(dst, {**metadata, "quantization": {"kind": "dynamic int8", "ops": list(op_types),
                                                     "per_channel": per_channel, "nodes": len(nodes)}})
    return dst


# --- sizes --------------------------------------------------------------------------------------------------

def file_bytes(path: str | os.PathLike) -> int:
    """Size of one file on disk, in bytes."""
    return Path(path).stat().st_size


def torch_bytes(model: nn.Module) -> int:
    """Bytes of the weights PyTorch loads for `model` (parameters and buffers, a shared tensor once): the size
    of its safetensors file less the few-kB header."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())


# --- serving ------------------------------------------------------------------------------------------------

def _allow_spinning() -> bool:
    """Let idle worker threads spin unless OMP_WAIT_POLICY=PASSIVE (as torch's OpenMP threads on a busy machine)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on `path` with `threads` intra-op threads (default: torch.get_num_threads())."""
    import onnxruntime as ort

    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if _allow_spinning() else "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{Path(path).name!r} is not an ONNX model onnxruntime can run ({exc})") from exc


class OnnxModel:
    """An exported multi-task graph in onnxruntime, with the tokenizer and label names: `predict(texts)` answers
    like `MultiTaskModel.predict`."""

    def __init__(self, path: str | os.PathLike, tokenizer, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        self.session = session(self.path, threads)
        self.metadata = _check_metadata(self.session.get_modelmeta().custom_metadata_map, self.path.name)
        self.label_names = {t: tuple(labels) for t, labels in self.metadata["tasks"].items()}
        self.backbone_name = self.metadata["backbone"]
        self.max_seq_length = int(self.metadata["max_seq_length"])
        self.tokenizer = tokenizer
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = set(self.input_names) - set(_tokenizer_arrays(tokenizer, ["a"], self.max_seq_length))
        if missing:
            raise ValueError(f"the tokenizer gives no {sorted(missing)}, which the graph {self.path.name!r} needs")

    @classmethod
    def load(cls, folder: str | os.PathLike, quantized: bool = True, threads: int | None = None) -> OnnxModel:
        """The int8 (or, with quantized=False, the fp32) graph of an export folder, with its saved tokenizer."""
        config = read_export(folder)
        name = INT8 if quantized else FP32
        if name not in config["files"]:
            raise FileNotFoundError(f"{Path(folder).name!r} holds no {name} (exported with quantize=False?); "
                                    f"it has {', '.join(f for f in config['files'] if f.endswith('.onnx'))}")
        return cls(Path(folder) / name, bb.load_tokenizer(Path(folder) / TOKENIZER), threads)

    @property
    def tasks(self) -> list[str]:
        """The task names, in head order."""
        return list(self.label_names)

    def _check_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a list of task names, got one string {tasks!r}; wrap it in a list")
        tasks = self.tasks if tasks is None else list(tasks)
        for task in tasks:
            if task not in self.label_names:
                raise KeyError(f"unknown task {task!r}; this model's tasks are: {', '.join(self.label_names)}")
        return tasks

    def run(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Logits of every task (or of `tasks`) for one batch of texts, as the graph gives them."""
        tasks = self._check_tasks(tasks)
        arrays = _tokenizer_arrays(self.tokenizer, check_texts(texts), self.max_seq_length)
        outputs = self.session.run([self.metadata["outputs"][t] for t in tasks],
                                   {n: arrays[n] for n in self.input_names})
        return dict(zip(tasks, outputs))

    def logits(self, texts: Sequence[str], batch_size: int = 64,
               tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits of every task (or `tasks`) in input order, in length-sorted batches (the library's one loop)."""
        texts, tasks = check_texts(texts), self._check_tasks(tasks)

        def batch(idx: np.ndarray) -> list[torch.Tensor]:
            out = self.run([texts[i] for i in idx], tasks)
            return [torch.from_numpy(out[t]) for t in tasks]

        return dict(zip(tasks, map_batches(batch, [len(t) for t in texts], batch_size)))

    def predict(self, texts: Sequence[str], batch_size: int = 64, tasks: Sequence[str] | None = None) -> pd.DataFrame:
        """A label and per-label probabilities of every task (or `tasks`) per text: MultiTaskModel.predict's table."""
        texts = check_texts(texts)
        logits = self.logits(texts, batch_size, tasks)
        return probability_table(texts, {t: torch.softmax(v, dim=-1) for t, v in logits.items()}, self.label_names)

    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name!r}, backbone={self.backbone_name!r}, tasks={self.label_names})"


def onnx_model(model: MultiTaskModel, path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Serve a graph exported from `model` with `model`'s own tokenizer (no export folder needed)."""
    return OnnxModel(path, bb.tokenizer_of(model.backbone), threads)


# --- export folders -----------------------------------------------------------------------------------------

def read_export(folder: str | os.PathLike) -> dict:
    """An export folder's summary (export.json), after checking it is complete and uncorrupted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no export folder at {folder}")
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder.name!r} is not an mtl_utils export folder (no {CONFIG}); "
                         "write one with export_checkpoint")
    if not is_complete(folder):
        raise ValueError(f"{folder.name!r} is not a complete export (partly written or corrupted); export it again")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder.name!r} has format {config.get('format')!r}; this version reads {FORMAT!r}")
    return config


def _is_export(folder: Path) -> bool:
    try:
        json.loads((folder / CONFIG).read_text())["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def largest_difference(model: MultiTaskModel, onnx: OnnxModel, texts: Sequence[str] = _PROBES) -> dict[str, float]:
    """Per task, the largest |logit difference| between the PyTorch model and the ONNX graph on `texts`."""
    texts = check_texts(texts)
    with torch.no_grad(), eval_mode(model):
        embeddings = model.embed(texts, batch_size=2)
        ours = {t: model.head(t)(embeddings) for t in model.tasks}
    theirs = onnx.logits(texts, batch_size=2)  # small batches: the long probe pads only its own
    return {t: float((ours[t].cpu() - theirs[t]).abs().max()) for t in model.tasks}


def export_model(model: MultiTaskModel, out_folder: str | os.PathLike, quantize: bool = True,
                 opset: int = DEFAULT_OPSET, source: str = "") -> dict:
    """Write an export folder for `model`: model.onnx, model.int8.onnx, tokenizer/, export.json (atomically).

    The fp32 graph is checked against PyTorch on a few sentences before the folder appears (largest logit
    difference within FP32_ATOL); the int8 graph's difference is recorded. An existing export folder is
    replaced, and so is an empty folder; any other existing path is refused.
    """
    out = Path(out_folder)
    if out.exists() and not (out.is_dir() and (_is_export(out) or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not an mtl_utils export folder; choose a new folder (an "
                              "existing export folder is replaced)")
    with atomic_dir(out) as tmp:
        export_onnx(model, tmp / FP32, opset)
        bb.tokenizer_of(model.backbone).save_pretrained(str(tmp / TOKENIZER))
        tokenizer = bb.load_tokenizer(tmp / TOKENIZER)
        _check_tokenizer(model, tokenizer)
        gaps = {"fp32": largest_difference(model, OnnxModel(tmp / FP32, tokenizer))}
        if max(gaps["fp32"].values()) > FP32_ATOL:
            raise RuntimeError(f"the exported graph's logits differ from PyTorch's by up to "
                               f"{max(gaps['fp32'].values()):.2e} (tolerance {FP32_ATOL:g}): the export is wrong")
        if quantize:
            quantize_int8(tmp / FP32, tmp / INT8)
            gaps["int8"] = largest_difference(model, OnnxModel(tmp / INT8, tokenizer))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        config = {**read_metadata(tmp / FP32), "opset": opset, "source": source,
                  "files": {f: file_bytes(tmp / f) for f in files},
                  "pytorch_bytes": torch_bytes(model), "largest_logit_difference": gaps}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return {"folder": str(out), **config}


def _check_tokenizer(model: MultiTaskModel, tokenizer) -> None:
    """Raise unless the saved tokenizer gives exactly the arrays the backbone's own preprocessing gives."""
    theirs = model.features(_PROBES)
    ours = _tokenizer_arrays(tokenizer, _PROBES, int(model.backbone.max_seq_length))
    for name, value in theirs.items():
        if isinstance(value, torch.Tensor) and not np.array_equal(ours.get(name), value.cpu().numpy()):
            raise RuntimeError(f"the saved tokenizer's {name!r} differs from the backbone's own preprocessing; "
                               "this backbone's tokenisation cannot be exported")


def export_checkpoint(checkpoint_folder: str | os.PathLike, out_folder: str | os.PathLike, quantize: bool = True,
                      opset: int = DEFAULT_OPSET) -> dict:
    """Load a checkpoint (mtl_utils.checkpoint) and write its export folder; returns export.json's content plus
    "folder". This is `python -m mtl_utils.cli export CHECKPOINT OUT`."""
    from .freezing import freeze_all

    model = freeze_all(MultiTaskModel.load(checkpoint_folder))  # frozen: a snapshot for serving
    return export_model(model.eval(), out_folder, quantize, opset, source=Path(checkpoint_folder).name)
