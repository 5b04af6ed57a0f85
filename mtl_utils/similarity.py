"""Which layers moved: linear CKA between two backbones' layer-by-layer sentence representations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from .features import eval_mode
from .model import check_texts, length_order


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


@torch.no_grad()
def layer_representations(backbone: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Mask-mean-pooled hidden states of every stage (embeddings output, then each transformer layer), each (n, d)."""
    texts = check_texts(texts)
    auto = backbone[0].auto_model
    out: list[torch.Tensor] | None = None
    with eval_mode(backbone):
        order = length_order([len(t) for t in texts])
        for start in range(0, len(texts), batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            features = backbone.preprocess([texts[i] for i in idx])
            inputs = {k: v.to(backbone.device) for k, v in features.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = auto(**inputs, output_hidden_states=True).hidden_states
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = [((h * mask).sum(1) / mask.sum(1)).float().cpu() for h in hidden]
            if out is None:
                out = [torch.empty(len(texts), p.shape[-1]) for p in pooled]
            for store, p in zip(out, pooled):
                store[idx] = p
    return out or []


def layer_cka(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    """Linear CKA stage by stage between two `layer_representations` of the same texts."""
    if len(reference) != len(other):
        raise ValueError(f"different numbers of stages: {len(reference)} and {len(other)}")
    return [linear_cka(a, b) for a, b in zip(reference, other)]
