"""Which layers moved: linear CKA between two backbones' layer-by-layer sentence representations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import backbone as bb
from .data import check_texts
from .model import map_batches


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) of two (n, d) representations of the same n inputs.

    1 means the same up to rotation and isotropic scaling; it is invariant to those, not to arbitrary linear maps.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected two (n, d) matrices with the same n, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear CKA needs at least 2 inputs")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if norms == 0:
        raise ValueError("a representation is constant over the inputs: CKA is undefined")
    return float(cross / norms)


def layer_representations(backbone: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Mask-mean-pooled hidden states of every stage (embeddings output, then each transformer layer), each (n, d)."""
    texts = check_texts(texts)

    def pooled(idx) -> list[torch.Tensor]:
        features = {k: v.to(backbone.device) for k, v in backbone.preprocess([texts[i] for i in idx]).items()
                    if isinstance(v, torch.Tensor)}
        mask = features["attention_mask"].unsqueeze(-1).float()
        return [((h * mask).sum(1) / mask.sum(1)).float().cpu() for h in bb.hidden_states(backbone, features)]

    return map_batches(pooled, [len(t) for t in texts], batch_size, module=backbone)


def layer_cka(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    """Linear CKA stage by stage between two `layer_representations` of the same texts."""
    if len(reference) != len(other):
        raise ValueError(f"different numbers of stages: {len(reference)} and {len(other)}")
    return [linear_cka(a, b) for a, b in zip(reference, other)]
