"""Long texts: what truncation cuts (counted against the tokenizer), and windows pooled into one embedding."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch

from mtl_utils import backbone as bb
from mtl_utils import long_text
from mtl_utils.data import DataWarning
from mtl_utils.evaluation import predict_proba
from mtl_utils.model import MultiTaskModel

ONE_TOKEN_WORDS = "good bad movie film plot actor story scene very quite".split()  # one WordPiece each


def words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(ONE_TOKEN_WORDS, n))


def test_windows_cover_every_token_with_the_stride():
    assert long_text.windows(range(10), 4, 2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert long_text.windows(range(9), 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [5, 6, 7, 8]]  # the last ends at the end
    assert long_text.windows([1, 2], 4, 2) == [[1, 2]]
    with pytest.raises(ValueError, match="stride must be from 1 to the window size 4"):
        long_text.windows(range(9), 4, 0)


def test_truncation_counts_what_the_backbone_cuts(tiny_backbone, monkeypatch):
    tokenizer = tiny_backbone.tokenizer
    assert tiny_backbone.max_seq_length == 64
    texts = ["good plot", words(100), words(63), words(62, seed=1)]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts]  # with [CLS] and [SEP]
    assert tokens == [4, 102, 65, 64]
    seen = []

    real = bb.token_ids

    def spy(backbone, batch, special=True):
        seen.extend(batch)
        return real(backbone, batch, special)

    monkeypatch.setattr(bb, "token_ids", spy)
    report = long_text.truncation(tiny_backbone, texts)
    assert report == {"texts": 4, "cut": 2, "share_cut": 0.5, "max_tokens": 64, "tokens_lost": 38 + 1,
                      "share_of_their_tokens_lost": 39 / (102 + 65), "longest": 102}
    assert "good plot" not in seen  # a text too short to be cut is never tokenised
    with pytest.warns(DataWarning, match=r"task 'x' train: 2 of 4 texts \(50\.0%\) are longer than the 64 tokens"
                                         r".*losing 39 tokens.*the longest has 102.*long_text\.encode"):
        long_text.warn_if_truncated(tiny_backbone, texts, "task 'x' train")


def test_short_texts_get_the_backbone_s_own_embedding(tiny_backbone):
    texts = ["good plot", "a very quite long film about an actor", "bad"]
    torch.testing.assert_close(long_text.encode(tiny_backbone, texts),
                               tiny_backbone.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-5)


def test_windows_are_pooled_by_their_tokens(tiny_backbone):
    # 124 tokens in windows of 62 (64 minus [CLS] and [SEP]): every window is "hello" x 62, with or without overlap
    same = long_text.encode(tiny_backbone, ["hello " * 124])
    torch.testing.assert_close(long_text.encode(tiny_backbone, ["hello " * 124], overlap=0.5), same, atol=1e-6, rtol=0)
    torch.testing.assert_close(same, tiny_backbone.encode(["hello " * 62], convert_to_tensor=True), atol=1e-5,
                               rtol=1e-5)
    # different windows: the mean of each window's own embedding, normalised again (the backbone normalises)
    text = words(150, seed=2)
    ids = tiny_backbone.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) == 150
    parts = long_text.windows(ids, 62, 31)
    assert [p[0] for p in parts] == [ids[0], ids[31], ids[62], ids[88]] and {len(p) for p in parts} == {62}
    each = tiny_backbone.encode([tiny_backbone.tokenizer.decode(p) for p in parts], convert_to_tensor=True)
    expected = torch.nn.functional.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(long_text.encode(tiny_backbone, [text], overlap=0.5)[0], expected, atol=1e-5, rtol=1e-5)
    truncated = tiny_backbone.encode([text], convert_to_tensor=True)[0]
    assert not torch.allclose(truncated, expected, atol=1e-3)  # the tail changed the embedding
    no_overlap = long_text.encode(tiny_backbone, [text])[0]  # the default: windows at 0, 62 and 88 (to the end)
    ends = [ids[:62], ids[62:124], ids[88:]]
    alone = tiny_backbone.encode([tiny_backbone.tokenizer.decode(p) for p in ends], convert_to_tensor=True)
    torch.testing.assert_close(no_overlap, torch.nn.functional.normalize(alone.mean(0), dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="overlap is a fraction"):
        long_text.encode(tiny_backbone, [text], overlap=1.0)


def test_windowed_embeddings_feed_the_heads(tiny_backbone):
    model = MultiTaskModel(tiny_backbone, {"mood": ("bad", "good")}, backbone_name="tiny")
    texts = [words(120, seed=s) for s in range(3)] + ["good"]
    source = long_text.WindowedEmbeddings(model.backbone, texts)
    probs = predict_proba(model, "mood", source)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(1), 1, atol=1e-6)
    expected = model.predict_embeddings(long_text.encode(model.backbone, texts))["mood"].numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_a_token_covers_at_least_one_byte(tiny_backbone):
    """What lets `token_counts` skip short texts: no text has more tokens than UTF-8 bytes (plus [CLS], [SEP])."""
    chars = [chr(c) for c in range(0x20, 0x30000) if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]
    texts = ["".join(chars[i:i + 200]) for i in range(0, len(chars), 200)]
    texts += [" ".join(chars[i:i + 100]) for i in range(0, len(chars), 100)]  # one character a word: most tokens
    ids = tiny_backbone.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    assert all(len(i) <= len(t.encode("utf-8")) + 2 for i, t in zip(ids, texts))
