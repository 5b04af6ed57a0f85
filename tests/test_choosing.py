"""Helpers behind notebook 06 (choosing a backbone): size on disk, encoding throughput, the paraphrase probe."""

from __future__ import annotations

import pytest

from mtl_utils import backbones, measure
from mtl_utils.backbones import BackboneUnavailableError, backbone_disk_bytes, folder_bytes
from mtl_utils.cache import COMPLETE_MARKER
from mtl_utils.probes import PARAPHRASE_TRIPLES, paraphrase_probe

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")


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


def test_encoding_throughput_is_sentences_per_median_second(tiny_backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "median_seconds", lambda fn, repeats, warmup: (calls.append((repeats, warmup)),
                                                                                 fn(), 0.5)[-1])
    texts = ["a short one.", "a slightly longer sentence here.", "three."]
    assert measure.encoding_throughput(tiny_backbone, texts, batch_size=2, repeats=4) == pytest.approx(6.0)
    assert calls == [(4, 0)]
    assert measure.encoding_throughput(tiny_backbone, texts) > 0  # real timing
    with pytest.raises(ValueError, match="at least one"):
        measure.encoding_throughput(tiny_backbone, [])


def test_paraphrase_probe(tiny_backbone):
    assert len(PARAPHRASE_TRIPLES) == 12 and all(len(set(t)) == 3 for t in PARAPHRASE_TRIPLES)
    result = paraphrase_probe(tiny_backbone)
    assert set(result) == {"paraphrase closer", "mean margin"}
    assert 0 <= result["paraphrase closer"] <= 1 and -2 <= result["mean margin"] <= 2
    # a sentence is its own perfect paraphrase: always closer, margin 1 - cosine to the look-alike
    same = [(s, s, d) for s, _, d in PARAPHRASE_TRIPLES[:4]]
    assert paraphrase_probe(tiny_backbone, same)["paraphrase closer"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        paraphrase_probe(tiny_backbone, [])
