"""Deployment: one ONNX graph for every task (dynamic batch and length), its int8 twin, onnxruntime's predict
against the PyTorch model's, export folders; and the same graph for each real offline backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from mtl_utils import export
from mtl_utils.export import (
    FP32,
    FP32_ATOL,
    INT8,
    OnnxModel,
    export_checkpoint,
    export_model,
    export_onnx,
    onnx_model,
    quantize_int8,
    read_export,
    read_metadata,
)
from mtl_utils.model import MultiTaskModel
from mtl_utils.offline.cache import is_complete

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")

TEXTS = ["What is the capital of France?", "A warm, funny and moving film.", "Who",
         "The plot is thin but the actors carry it from the first scene to the last one.", "Dull.",
         "How many feet are in a mile, and why do people still use miles at all?"]
TASKS = {"topic": ["what", "who", "where"], "mood": ["bad", "good"]}
# int8 against PyTorch on the tiny backbone with these heads: measured at most 3e-3 on the probabilities; the
# bound is about three times that, for other CPUs' integer kernels.
INT8_PROB_ATOL = 1e-2


@pytest.fixture(scope="module")
def model(tiny_backbone_dir):
    from sentence_transformers import SentenceTransformer

    tiny_backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    # MLP heads (the graph carries any head); the backbone's name is its folder, so a checkpoint loads by name
    m = MultiTaskModel(tiny_backbone, TASKS, head="mlp", backbone_name=str(tiny_backbone_dir)).eval()
    # A random tiny backbone gives nearly the same embedding for every text: centre and magnify the heads'
    # first layers on these texts, so labels differ between texts and a wrong row order would show.
    with torch.no_grad():
        embeddings = m.embed(TEXTS)
        for head in m.heads.values():
            head[0].weight.mul_(1 / embeddings.std(0).mean())
            head[0].bias.copy_(-head[0].weight @ embeddings.mean(0))
    return m


@pytest.fixture(scope="module")
def graph(model, tmp_path_factory) -> Path:
    """One export for the module's tests (none of them changes the model or the file)."""
    return export_onnx(model, tmp_path_factory.mktemp("graph") / "model.onnx")


def torch_logits(model: MultiTaskModel, texts: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        features = model.features(texts)
        return {t: model(t, features).numpy() for t in model.tasks}


def test_graph_has_named_inputs_one_output_per_task_and_dynamic_axes(model, graph):
    proto = onnx.load(str(graph))
    onnx.checker.check_model(proto)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs == {n: ["batch", "sequence"] for n in ("input_ids", "token_type_ids", "attention_mask")}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outputs == {"logits.topic": ["batch", 3], "logits.mood": ["batch", 2]}
    meta = read_metadata(graph)
    assert meta["tasks"] == TASKS and meta["max_seq_length"] == 64 and meta["outputs"]["mood"] == "logits.mood"


@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS[2:3], TEXTS, TEXTS[:2] * 7])
def test_fp32_graph_matches_pytorch_for_any_batch_and_length(model, graph, texts):
    # one text (no padding), short and long batches: the graph was traced on one padded batch of two
    ours = onnx_model(model, graph)
    out = ours.run(texts)
    theirs = torch_logits(model, texts)
    for task in model.tasks:
        assert out[task].shape == theirs[task].shape == (len(texts), len(TASKS[task]))
        np.testing.assert_allclose(out[task], theirs[task], rtol=0, atol=FP32_ATOL)


def test_truncates_at_the_backbones_max_seq_length(model, graph):
    long = [" ".join(["word"] * 500), "short"]
    features = onnx_model(model, graph).tokenizer(long, padding=True, truncation=True, max_length=64)
    assert len(features["input_ids"][0]) == 64  # the tiny backbone's max_seq_length
    np.testing.assert_allclose(onnx_model(model, graph).run(long)["topic"], torch_logits(model, long)["topic"],
                               rtol=0, atol=FP32_ATOL)


def test_predict_gives_multitaskmodels_table(model, graph):
    texts = TEXTS * 3
    expected = model.predict(texts, batch_size=4)
    got = onnx_model(model, graph).predict(texts, batch_size=4)  # several length-sorted batches, put back in order
    assert list(got.columns) == list(expected.columns)
    assert got["text"].tolist() == texts
    for task in TASKS:
        assert got[task].tolist() == expected[task].tolist()
    assert expected["topic"].nunique() > 1  # a real check: the labels vary
    numbers = [c for c in expected.columns if c.startswith("P(") or c.endswith("confidence")]
    np.testing.assert_allclose(got[numbers].to_numpy(), expected[numbers].to_numpy(), rtol=0, atol=1e-5)
    one = onnx_model(model, graph).predict(texts[:3], tasks=["mood"])
    assert list(one.columns) == list(model.predict(texts[:3], tasks=["mood"]).columns)


def test_int8_graph_is_smaller_and_close(model, graph, tmp_path):
    small = quantize_int8(graph, tmp_path / "model.int8.onnx")
    assert os.path.getsize(small) * 3 < os.path.getsize(graph)
    ops = {n.name: n.op_type for n in onnx.load(str(small)).graph.node}
    assert "MatMulInteger" in ops.values() and "DequantizeLinear" in ops.values()  # linear layers, embedding table
    # the heads' layers (Gemm in the fp32 graph; onnxruntime splits each into MatMul + Add) stay in fp32
    heads = [n.name for n in onnx.load(str(graph)).graph.node if n.op_type == "Gemm"]
    assert len(heads) == len([m for m in model.heads.modules() if isinstance(m, torch.nn.Linear)])
    assert [ops[f"{name}_MatMul"] for name in heads] == ["MatMul"] * len(heads)
    meta = read_metadata(small)
    assert meta["tasks"] == TASKS and meta["quantization"]["per_channel"] is True
    got = onnx_model(model, small).predict(TEXTS)
    expected = model.predict(TEXTS)
    numbers = [c for c in expected.columns if c.startswith("P(")]
    gap = np.abs(got[numbers].to_numpy() - expected[numbers].to_numpy()).max()
    assert 0 < gap <= INT8_PROB_ATOL  # quantised (not the fp32 graph again), and close


def test_export_is_deterministic(model, graph, tmp_path):
    # the same model gives the same bytes: an export can be checked against a stored checksum
    again = export_onnx(model, tmp_path / "again.onnx")
    assert again.read_bytes() == graph.read_bytes()


def test_export_leaves_the_model_as_it_was(model, tmp_path):
    model.train()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx")
    assert model.heads.training and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # and the graph is the eval-mode model (dropout off), whatever mode the model was in
    texts = TEXTS[:3]
    model.eval()
    np.testing.assert_allclose(onnx_model(model, tmp_path / "m.onnx").run(texts)["topic"],
                               torch_logits(model, texts)["topic"], rtol=0, atol=FP32_ATOL)


def test_bad_inputs_give_clear_errors(model, graph, tmp_path):
    with pytest.raises(TypeError, match="exports a MultiTaskModel"):
        export_onnx(model.backbone, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset must be an integer from 14 to 20"):
        export_onnx(model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "x.bin")
    served = onnx_model(model, graph)
    with pytest.raises(KeyError, match="unknown task 'colour'; this model's tasks are: topic, mood"):
        served.predict(TEXTS, tasks=["colour"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        served.predict(TEXTS, tasks="mood")
    with pytest.raises(TypeError, match="got one string"):
        served.predict("one text")
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        served.predict(["fine", "  "])
    with pytest.raises(ValueError, match="batch_size must be an integer of at least 1"):
        served.predict(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="threads must be an integer of at least 1"):
        onnx_model(model, graph, threads=0)

    plain = tmp_path / "plain.onnx"  # an ONNX file, but not ours
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [value("x", 1, [1])], [value("y", 1, [1])])),
              str(plain))
    with pytest.raises(ValueError, match="not one mtl_utils.export wrote"):
        read_metadata(plain)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        read_metadata(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="not an ONNX model onnxruntime can run"):
        OnnxModel(tmp_path / "junk.onnx", served.tokenizer)
    with pytest.raises(ValueError, match="not one mtl_utils.export wrote"):
        OnnxModel(plain, served.tokenizer)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxModel(tmp_path / "missing.onnx", served.tokenizer)
    with pytest.raises(ValueError, match="destination other than"):
        quantize_int8(graph, graph)
    with pytest.raises(ValueError, match="quantises MatMul, Gather nodes, not \\['Conv'\\]"):
        quantize_int8(graph, tmp_path / "q.onnx", op_types=["Conv"])
    with pytest.raises(FileNotFoundError, match="no export folder"):
        OnnxModel.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not an mtl_utils export folder"):
        OnnxModel.load(tmp_path)


def test_export_folder_round_trip(model, tmp_path):
    checkpoint = model.save(tmp_path / "ckpt")
    info = export_checkpoint(checkpoint, tmp_path / "deploy")
    folder = tmp_path / "deploy"
    assert info["folder"] == str(folder) and is_complete(folder)
    assert set(info["files"]) >= {FP32, INT8, "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    stored = json.loads((folder / "export.json").read_text())
    assert stored == read_export(folder) and stored["tasks"] == TASKS and stored["source"] == "ckpt"
    assert max(stored["largest_logit_difference"]["fp32"].values()) <= FP32_ATOL
    assert stored["files"][INT8] * 3 < stored["files"][FP32] and stored["pytorch_bytes"] == export.torch_bytes(model)
    assert not any(str(tmp_path) in json.dumps(v) for k, v in stored.items())  # no absolute paths inside

    texts = TEXTS * 2
    expected = model.predict(texts)
    fp32 = OnnxModel.load(folder, quantized=False, threads=1)  # the folder alone: its own tokenizer, no torch model
    got = fp32.predict(texts)
    numbers = [c for c in expected if c.startswith("P(") or c.endswith("confidence")]
    pd.testing.assert_frame_equal(got.drop(columns=numbers), expected.drop(columns=numbers))
    np.testing.assert_allclose(got[numbers].to_numpy(), expected[numbers].to_numpy(), rtol=0, atol=1e-5)
    assert OnnxModel.load(folder).path.name == INT8  # the int8 graph by default

    # exporting again replaces an export folder; anything else is refused
    export_model(model, folder, quantize=False)
    assert INT8 not in read_export(folder)["files"]
    with pytest.raises(FileNotFoundError, match="holds no model.int8.onnx"):
        OnnxModel.load(folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an mtl_utils export folder"):
        export_model(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):
        export_model(model, tmp_path / "mine" / "notes.txt")
    (folder / FP32).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="not a complete export"):
        OnnxModel.load(folder, quantized=False)


def test_sizes(model, graph):
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert export.torch_bytes(model) == weights  # the tiny model shares no tensors
    assert export.file_bytes(graph) == os.path.getsize(graph)


# --- real backbones -----------------------------------------------------------------------------------------

_USER_CACHE = os.environ.get("MTL_UTILS_CACHE")  # `make test` sets it: mpnet is materialised there once


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    return Path(_USER_CACHE) if _USER_CACHE else tmp_path_factory.mktemp("real_cache")


@pytest.mark.assets
@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "all-mpnet-base-v2", "paraphrase-MiniLM-L3-v2"])
def test_real_backbones_export_with_their_own_pipeline(name, real_cache_dir, monkeypatch, tmp_path):
    from sentence_transformers.base.modules import Normalize

    from mtl_utils.backbone import load_backbone

    monkeypatch.setenv("MTL_UTILS_CACHE", str(real_cache_dir))
    backbone = load_backbone(name)
    normalised = any(isinstance(m, Normalize) for m in backbone)
    assert normalised == (name != "paraphrase-MiniLM-L3-v2")  # L3: mean pooling, no normalisation
    model = MultiTaskModel(backbone, TASKS, backbone_name=name).eval()  # random heads: PyTorch vs ONNX, same weights
    info = export_model(model, tmp_path / "deploy", quantize=name == "paraphrase-MiniLM-L3-v2")  # checks tokenizer
    proto = onnx.load(str(tmp_path / "deploy" / FP32))
    ops = {n.op_type for n in proto.graph.node}
    assert ("ReduceL2" in ops) == normalised  # the graph normalises exactly where the backbone does
    inputs = [i.name for i in proto.graph.input]
    del proto
    assert inputs == [n for n, v in model.features(["a"]).items() if isinstance(v, torch.Tensor)]
    texts = [*TEXTS, " ".join(["a long sentence that goes past the backbone's limit"] * 60)]
    served = OnnxModel.load(tmp_path / "deploy", quantized=False)
    for batch in (texts[:1], TEXTS, texts[-2:]):  # one text; short ones; the long one truncated, beside a short one
        got, expected = served.run(batch), torch_logits(model, batch)
        for task in TASKS:
            np.testing.assert_allclose(got[task], expected[task], rtol=0, atol=FP32_ATOL)
    assert max(info["largest_logit_difference"]["fp32"].values()) <= FP32_ATOL
    if "int8" in info["largest_logit_difference"]:
        assert info["files"][INT8] * 3 < info["files"][FP32]
