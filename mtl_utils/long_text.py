"""Texts longer than the backbone reads: how much truncation cuts, and a long-text mode that reads everything.

A SentenceTransformer reads at most `max_seq_length` tokens (all-MiniLM-L6-v2: 256, all-mpnet-base-v2: 384)
and silently drops the rest. `truncation` counts what is cut; `warn_if_truncated` says so (training calls it
on every task's train and validation texts). The long-text mode, `encode`, splits each text into windows of
tokens the backbone can read (overlapping if asked), embeds every window, and pools the windows (their mean):
one embedding per text, for the heads of a frozen backbone. On 189 long convention speeches (benchmarks/
long_text.py) windows beat truncation by about 6 points; 50% overlap cost more and did not do better, so
the default is no overlap.

    emb = long_text.encode(model.backbone, texts)          # (n, dim), like model.embed(texts) without the cut
    probs = model.predict_embeddings(emb)                   # every head answers from the whole text
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import backbone as bb
from .data import DataWarning, check_texts
from .model import map_batches

# A WordPiece, byte-level BPE or SentencePiece token covers at least one UTF-8 byte of the text (checked for the
# MiniLM and mpnet tokenizers on every built-in text and on every assigned Unicode character): a text of fewer
# bytes than the maximum length, less a few special tokens, cannot be cut, so only longer texts are tokenised.
_SPECIAL_SLACK = 8


def token_counts(backbone: SentenceTransformer, texts: Sequence[str]) -> np.ndarray:
    """Tokens of each text with the special tokens, uncut (texts too short to be cut are not tokenised)."""
    limit = backbone.max_seq_length
    counts = np.zeros(len(texts), dtype=np.int64)
    maybe = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + _SPECIAL_SLACK > limit]
    if maybe:
        ids = bb.token_ids(backbone, [texts[i] for i in maybe])
        counts[maybe] = [len(x) for x in ids]
    return counts


def truncation(backbone: SentenceTransformer, texts: Sequence[str]) -> dict[str, float]:
    """How many texts the backbone cuts at its maximum length, and how many tokens it drops."""
    return _report(backbone, check_texts(texts))


def _report(backbone: SentenceTransformer, texts: list[str]) -> dict[str, float]:
    counts = token_counts(backbone, texts)
    limit = backbone.max_seq_length
    cut = counts > limit
    lost = int((counts[cut] - limit).sum())
    return {"texts": len(counts), "cut": int(cut.sum()), "share_cut": float(cut.mean()), "max_tokens": limit,
            "tokens_lost": lost, "share_of_their_tokens_lost": float(lost / counts[cut].sum()) if cut.any() else 0.0,
            "longest": int(counts.max())}


def warn_if_truncated(backbone: SentenceTransformer, texts: Sequence[str], what: str) -> dict[str, float]:
    """Warn (DataWarning) when some of `texts` (a Task's, already checked) are longer than the backbone reads;
    returns `truncation`."""
    report = _report(backbone, list(texts))
    if report["cut"]:
        warnings.warn(
            f"{what}: {report['cut']} of {report['texts']} texts ({100 * report['share_cut']:.1f}%) are longer than "
            f"the {report['max_tokens']} tokens the backbone reads and are cut there, losing {report['tokens_lost']:,} "
            f"tokens ({100 * report['share_of_their_tokens_lost']:.0f}% of those texts; the longest has "
            f"{report['longest']:,}). To read them whole: mtl_utils.long_text.encode (token windows, pooled), "
            "or a backbone with a longer maximum length", DataWarning, stacklevel=2)
    return report


def windows(ids: Sequence[int], size: int, stride: int) -> list[list[int]]:
    """Token windows of `size` that start every `stride` tokens and together cover every token (at least one)."""
    if not 0 < stride <= size:
        raise ValueError(f"stride must be from 1 to the window size {size}, got {stride}")
    ids = list(ids)
    starts = list(range(0, max(len(ids) - size, 0) + 1, stride))
    if starts[-1] + size < len(ids):
        starts.append(len(ids) - size)  # the last window ends at the last token
    return [ids[s:s + size] for s in starts]


def encode(backbone: SentenceTransformer, texts: Sequence[str], overlap: float = 0.0, batch_size: int = 32,
           progress: bool = False) -> torch.Tensor:
    """Embeddings of whole texts: windows of the backbone's maximum length, embedded and mean-pooled.

    A text that fits in one window gets exactly the backbone's own embedding. Longer texts are cut into
    windows of `max_seq_length` tokens (special tokens included) that start every (1 - `overlap`) of a window,
    the last one ending at the text's last token, so every window is full; the window embeddings are
    averaged, and normalised again if the backbone normalises. Runs without gradients, in eval mode: for a
    frozen backbone.
    """
    texts = check_texts(texts)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap is a fraction of a window, from 0 up to (not including) 1; got {overlap}")
    before, after = bb.special_tokens(backbone)
    size = backbone.max_seq_length - len(before) - len(after)
    stride = max(1, int(round(size * (1 - overlap))))
    owner, chunks = [], []
    for i, ids in enumerate(bb.token_ids(backbone, texts, special=False)):
        for chunk in windows(ids, size, stride):
            owner.append(i)
            chunks.append(before + chunk + after)
    device = next(backbone.parameters()).device

    def embed(idx: np.ndarray) -> torch.Tensor:
        features = bb.pad_token_ids(backbone, [chunks[j] for j in idx])
        features = {k: v.to(device) for k, v in features.items()}
        return backbone(features)["sentence_embedding"].float()

    parts = map_batches(embed, [len(c) for c in chunks], batch_size, module=backbone, progress=progress,
                        desc="encoding windows")
    owner_t = torch.tensor(owner, device=parts.device)
    pooled = torch.zeros(len(texts), parts.shape[1], dtype=parts.dtype, device=parts.device).index_add_(0, owner_t, parts)
    pooled /= torch.bincount(owner_t, minlength=len(texts)).to(parts.dtype)[:, None]
    if _normalises(backbone):
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled


def _normalises(backbone: SentenceTransformer) -> bool:
    """Whether the backbone's last step L2-normalises its embeddings."""
    return any(type(m).__name__ == "Normalize" for m in backbone.children())


class WindowedEmbeddings:
    """A sentence source (as `features.sentence_source` gives) for whole texts: `encode`'s embeddings, looked up.

    For the frozen backbone: `evaluation.predict_proba(model, task, WindowedEmbeddings(model.backbone, texts))`.
    """

    def __init__(self, backbone: SentenceTransformer, texts: Sequence[str], overlap: float = 0.0,
                 progress: bool = False) -> None:
        self.embeddings = encode(backbone, texts, overlap=overlap, progress=progress)
        self.lengths = np.array([len(t) for t in texts])

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        return self.embeddings[torch.as_tensor(np.asarray(idx))]
