"""The backbone: the registry, offline materialisation (mpnet from parts, MiniLM-L3 from ONNX), quiet loading,
its structure, and running its layers one range at a time."""

from __future__ import annotations

import dataclasses
import http.server
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_utils import backbone as backbones
from mtl_utils.backbone import (
    BACKBONES,
    BackboneUnavailableError,
    backbone_disk_bytes,
    backbone_path,
    backbone_table,
    folder_bytes,
    load_backbone,
)
from mtl_utils.model import eval_mode
from mtl_utils.offline.cache import COMPLETE_MARKER, is_complete, sha256_file
from mtl_utils.offline.models import MPNET_SAFETENSORS_SHA256

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")

SANITY = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub must not be contacted")


def _sanity_cosines(model) -> tuple[float, float]:
    e = torch.nn.functional.normalize(model.encode(SANITY, convert_to_tensor=True), dim=-1)
    return float(e[0] @ e[1]), float(e[0] @ e[2])


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    """One cache for the real-asset tests, so mpnet is reassembled once per session."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.fixture
def shared_cache(real_cache_dir, monkeypatch) -> Path:
    monkeypatch.setenv("MTL_UTILS_CACHE", str(real_cache_dir))
    return real_cache_dir


# --- fast: registry and helpers on the tiny backbone ---------------------------------------------


def test_registry_is_ordered_and_frozen():
    assert list(BACKBONES) == ["all-MiniLM-L6-v2", "all-mpnet-base-v2", "paraphrase-MiniLM-L3-v2",
                               "paraphrase-MiniLM-L6-v2"]
    assert [s.offline for s in BACKBONES.values()] == [True, True, True, False]
    assert BACKBONES["paraphrase-MiniLM-L6-v2"].stand_in == "paraphrase-MiniLM-L3-v2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        BACKBONES["all-MiniLM-L6-v2"].dim = 1  # type: ignore[misc]


def test_structure_layers_embeddings_and_stages(tiny_backbone):
    layers = backbones.layers(tiny_backbone)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 3
    assert layers is tiny_backbone[0].auto_model.encoder.layer
    assert backbones.embeddings(tiny_backbone) is tiny_backbone[0].auto_model.embeddings
    assert backbones.transformer(tiny_backbone) is tiny_backbone[0].auto_model
    assert backbones.architecture(tiny_backbone) == "bert" and backbones.hidden_size(tiny_backbone) == 32
    stages = backbones.stages(tiny_backbone)
    assert [name for name, _ in stages] == ["embeddings", "layer 0", "layer 1", "layer 2"]
    assert [m for _, modules in stages[1:] for m in modules] == list(layers)
    assert backbones.unused_modules(tiny_backbone) == [tiny_backbone[0].auto_model.pooler]


def test_helpers_reject_a_model_without_layers():
    for helper in (backbones.layers, backbones.embeddings, backbones.stages):
        with pytest.raises(TypeError, match="auto_model"):
            helper(torch.nn.Sequential(torch.nn.Linear(2, 2)))


TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot"]


def test_layers_run_by_range_give_what_the_whole_backbone_gives(tiny_backbone):
    features = tiny_backbone.preprocess(TEXTS)
    mask = features["attention_mask"]
    with torch.no_grad(), eval_mode(tiny_backbone):
        whole = tiny_backbone(dict(features))["sentence_embedding"]
        states = backbones.hidden_states(tiny_backbone, features)
        hidden = backbones.embed_tokens(tiny_backbone, features)
        torch.testing.assert_close(hidden, states[0], rtol=0, atol=1e-6)
        for start, stop in ((0, 1), (1, 2), (2, None)):  # layer by layer ...
            hidden = backbones.run_layers(tiny_backbone, hidden, mask, start, stop)
            torch.testing.assert_close(hidden, states[stop or 3], rtol=0, atol=1e-5)
        torch.testing.assert_close(backbones.pool(tiny_backbone, hidden, mask), whole, rtol=0, atol=1e-6)
        backbones.check_layer_running(tiny_backbone, features)  # ... and the check that guards it passes


def test_a_layer_runner_that_drifts_is_caught(tiny_backbone, monkeypatch):
    features = tiny_backbone.preprocess(TEXTS)
    real = backbones.run_layers
    monkeypatch.setattr(backbones, "run_layers", lambda st, h, m, start=0, stop=None: real(st, h, m, start, 2))
    with torch.no_grad(), eval_mode(tiny_backbone), pytest.raises(RuntimeError, match="use_cache=False"):
        backbones.check_layer_running(tiny_backbone, features)


def test_unknown_architecture_is_refused_by_the_layer_runner(tiny_backbone, monkeypatch):
    monkeypatch.setattr(tiny_backbone[0].auto_model.config, "model_type", "gpt2")
    with pytest.raises(NotImplementedError, match="bert, mpnet.*'gpt2'.*use_cache=False"):
        backbones.embed_tokens(tiny_backbone, tiny_backbone.preprocess(TEXTS))


def test_folder_bytes_counts_nested_files_but_not_the_cache_marker(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 5)
    (tmp_path / COMPLETE_MARKER).write_text("{}")
    assert folder_bytes(tmp_path) == 15


def test_backbone_disk_bytes_of_the_installed_minilm():
    size = backbone_disk_bytes("all-MiniLM-L6-v2")
    weights = backbones.backbone_path("all-MiniLM-L6-v2") / "model.safetensors"
    assert weights.stat().st_size < size < weights.stat().st_size + 2_000_000  # weights plus tokenizer and configs


def test_backbone_disk_bytes_of_a_hub_only_backbone_names_its_stand_in():
    with pytest.raises(BackboneUnavailableError, match="paraphrase-MiniLM-L3-v2"):
        backbone_disk_bytes("paraphrase-MiniLM-L6-v2")


def test_load_local_folder_is_quiet_and_in_eval_mode(tiny_backbone_dir, capfd):
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conftest pins the hub's own bars off; transformers' bar still turns on
        hf_logging.enable_progress_bar()
    try:
        model = load_backbone(str(tiny_backbone_dir))
        out, err = capfd.readouterr()
        assert (out, err) == ("", "")  # no "Loading weights" bar
        assert hf_logging.is_progress_bar_enabled()  # and the caller's setting is restored
    finally:
        hf_logging.disable_progress_bar()
    assert not model.training and not any(m.training for m in model.modules())
    assert model.mtl_name == str(tiny_backbone_dir)


def test_unknown_name_lists_the_known_backbones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "SentenceTransformer", _no_hub)
    with pytest.raises(BackboneUnavailableError) as info:
        load_backbone("no-such-backbone")
    assert all(name in str(info.value) for name in BACKBONES)
    with pytest.raises(KeyError, match="all-mpnet-base-v2"):
        backbone_path("no-such-backbone")
    with pytest.raises(KeyError, match="paraphrase-MiniLM-L3-v2"):
        backbone_table(["no-such-backbone"])


def test_an_empty_or_missing_backbone_name_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backbones, "SentenceTransformer", _no_hub)
    monkeypatch.setattr(backbones, "_hub_reachable", _no_hub)
    for bad in ("", "   "):
        for function in (load_backbone, backbone_path):
            with pytest.raises(ValueError, match="backbone name is empty; give one of all-MiniLM-L6-v2.*local folder"):
                function(bad)
    for bad in (None, 3, ["all-MiniLM-L6-v2"]):
        for function in (load_backbone, backbone_path):
            with pytest.raises(TypeError, match=f"named by a string .*got {type(bad).__name__}"):
                function(bad)


def test_a_backbone_folder_may_be_given_as_a_path(tiny_backbone_dir):
    assert load_backbone(tiny_backbone_dir).mtl_name == str(tiny_backbone_dir)


def test_hub_only_backbone_offline_names_its_stand_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "SentenceTransformer", _no_hub)
    for name in ["paraphrase-MiniLM-L6-v2", "sentence-transformers/paraphrase-MiniLM-L6-v2"]:
        with pytest.raises(BackboneUnavailableError, match="hub-only.*'paraphrase-MiniLM-L3-v2'"):
            load_backbone(name)
    with pytest.raises(BackboneUnavailableError, match="'paraphrase-MiniLM-L3-v2'"):
        backbone_path("paraphrase-MiniLM-L6-v2")


def test_hub_only_backbone_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    # offline mode not set, but the endpoint refuses connections: one quick request, no retries
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, so nothing listens there once closed
    for var in ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY",
                "all_proxy", "ALL_PROXY"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(backbones, "SentenceTransformer", _no_hub)
    with pytest.raises(BackboneUnavailableError, match="unreachable.*'paraphrase-MiniLM-L3-v2'"):
        load_backbone("paraphrase-MiniLM-L6-v2")


def test_hub_only_backbone_is_tried_by_hub_id_when_the_hub_answers(monkeypatch):
    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any HTTP answer means a hub is there
            self.end_headers()

        def log_message(self, *args):
            pass

    tried = []

    def fake_sentence_transformer(name, device):
        tried.append(name)
        raise OSError("no such repo")

    with http.server.HTTPServer(("127.0.0.1", 0), Hub) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setattr(backbones, "SentenceTransformer", fake_sentence_transformer)
        with pytest.raises(BackboneUnavailableError, match="no such repo.*'paraphrase-MiniLM-L3-v2'"):
            load_backbone("paraphrase-MiniLM-L6-v2")
        server.shutdown()
    assert tried == ["sentence-transformers/paraphrase-MiniLM-L6-v2"]


def test_table_of_a_hub_only_backbone_loads_nothing(monkeypatch):
    monkeypatch.setattr(backbones, "SentenceTransformer", _no_hub)
    table = backbone_table(["paraphrase-MiniLM-L6-v2"])
    assert table.to_dict("records") == [{
        "name": "paraphrase-MiniLM-L6-v2", "layers": 6, "dim": 384, "params": 22_713_216, "max_seq_length": 128,
        "normalized": False, "offline": False, "source": "hub only", "licence": "Apache-2.0"}]


# --- real assets ------------------------------------------------------------------------------------


@pytest.mark.assets
def test_minilm_l6(shared_cache, capfd):
    model = load_backbone("all-MiniLM-L6-v2")
    assert capfd.readouterr() == ("", "")
    assert backbone_path("all-MiniLM-L6-v2").name == "model"  # used in place, not copied into the cache
    assert len(backbones.layers(model)) == 6 and model.get_embedding_dimension() == 384
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert model.max_seq_length == 256 and not model.training and model.mtl_name == "all-MiniLM-L6-v2"
    same, other = _sanity_cosines(model)  # measured: 0.755, -0.105
    assert 0.6 < same < 0.85 and other < 0.2


@pytest.mark.assets
def test_mpnet_reassembled_once_and_verified(shared_cache):
    folder = backbone_path("all-mpnet-base-v2")
    assert folder == shared_cache / "models" / "all-mpnet-base-v2" and is_complete(folder)
    assert sha256_file(folder / "model.safetensors") == MPNET_SAFETENSORS_SHA256
    assert not list(folder.rglob("desktop.ini"))
    marker = (folder / COMPLETE_MARKER).stat()
    model = load_backbone("all-mpnet-base-v2")
    assert (folder / COMPLETE_MARKER).stat().st_ino == marker.st_ino  # not rebuilt
    assert len(backbones.layers(model)) == 12 and model.get_embedding_dimension() == 768
    assert sum(p.numel() for p in model.parameters()) == 109_486_464
    assert model.max_seq_length == 384 and model.mtl_name == "all-mpnet-base-v2"
    same, other = _sanity_cosines(model)  # measured: 0.660, -0.056
    assert 0.6 < same < 0.85 and other < 0.2
    with torch.no_grad():  # MPNet's layers (relative position bias) also run by range exactly
        backbones.check_layer_running(model, model.preprocess(SANITY))


@pytest.mark.assets
def test_minilm_l3_rebuilt_from_onnx_matches_onnxruntime(shared_cache):
    import onnxruntime as ort

    from mtl_utils.offline.assets import asset_path

    model = load_backbone("paraphrase-MiniLM-L3-v2")
    assert len(backbones.layers(model)) == 3 and model.get_embedding_dimension() == 384
    assert sum(p.numel() for p in model.parameters()) == 17_389_824  # includes the (unused) pooler
    assert model.max_seq_length == 128 and len(model) == 2  # Transformer + mean Pooling, no Normalize
    sentences = SANITY + ["What is the capital of Australia?", "This movie was a complete waste of two hours.", "Hi"]
    features = model.preprocess(sentences)
    with torch.no_grad():
        ours = model(dict(features))["sentence_embedding"].numpy()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(asset_path("paraphrase-MiniLM-L3-v2")), options,
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]  # no token_type_ids
    # the float output of shape (batch, 384) is the mean-pooled sentence embedding
    (name,) = [o.name for o in session.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2]
    (theirs,) = session.run([name], {k: features[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")})
    assert np.abs(ours - theirs).max() < 1e-5  # measured: 6e-7
    same, other = _sanity_cosines(model)  # measured: 0.780, -0.142
    assert 0.6 < same < 0.85 and other < 0.2


@pytest.mark.assets
def test_corrupted_or_partial_cache_folder_is_rebuilt_not_used():
    # the autouse fixture gives this test its own empty cache
    folder = backbone_path("paraphrase-MiniLM-L3-v2")
    weights = folder / "model.safetensors"
    good = sha256_file(weights)
    with open(weights, "r+b") as f:  # flip some bytes in the middle of a tensor
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00" * 64)
    assert not is_complete(folder)
    assert backbone_path("paraphrase-MiniLM-L3-v2") == folder and is_complete(folder)
    assert sha256_file(weights) == good  # the rebuild is deterministic, pooler included

    (folder / COMPLETE_MARKER).unlink()  # a folder a crash left unfinished
    backbone_path("paraphrase-MiniLM-L3-v2")
    assert is_complete(folder)
    same, _ = _sanity_cosines(load_backbone("paraphrase-MiniLM-L3-v2"))
    assert 0.6 < same < 0.85


@pytest.mark.assets
def test_backbone_table(shared_cache, monkeypatch):
    monkeypatch.setattr(backbones, "_hub_reachable", _no_hub)  # the table never asks the hub
    table = backbone_table()
    assert list(table.name) == list(BACKBONES)
    assert list(table.offline) == [True, True, True, False]
    assert list(table.layers) == [6, 12, 3, 6] and list(table.dim) == [384, 768, 384, 384]
    assert list(table.params) == [s.params for s in BACKBONES.values()]
    assert list(table.normalized) == [True, True, False, False]
    assert list(table.max_seq_length) == [256, 384, 128, 128]
