"""Where the training loop gets a batch's sentence embeddings: a source, picked from what is frozen.

    source = sentence_source(model, texts)   # once per split
    embeddings = source(idx)                 # each batch: the sentence embeddings of texts[idx]

Three sources give the same numbers at different costs:

- `FullForward`: tokenise once, run the whole backbone on every batch (something in the embeddings trains);
- `CachedPrefix`: the frozen bottom of the backbone ran once per text (`prefix_cache`); each batch runs only the
  layers above it;
- `CachedEmbeddings`: the backbone is frozen; each sentence's embedding was computed once, ever (`embedding_store`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from . import backbone as bb
from . import embedding_store, prefix_cache
from .embedding_store import cached_embeddings
from .model import MultiTaskModel

__all__ = ["CachedEmbeddings", "CachedPrefix", "FullForward", "cached_embeddings", "clear_memory_cache",
           "sentence_source"]


class FullForward:
    """Tokenise once, then run the whole backbone on every batch."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str]) -> None:
        self.model = model
        self.tokens = prefix_cache.Tokens(model.backbone, list(texts))
        self.lengths = self.tokens.lengths

    def batch_features(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The texts at `idx` tokenised and right-padded to the longest of them, as the tokenizer pads."""
        return self.tokens.batch(idx, self.model.device)

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        """Sentence embeddings of the texts at `idx`."""
        return self.model.sentence_embeddings(self.batch_features(idx))


class CachedPrefix(FullForward):
    """The frozen bottom of the backbone ran once per text; each batch runs only the layers above the cache.

    `boundary` layers are cached (default: every frozen layer). A lower boundary lets runs that unfreeze
    different numbers of top layers share one cache: the frozen layers between the boundary and the
    trainable ones run on every batch, without gradients.
    """

    def __init__(self, model: MultiTaskModel, texts: Sequence[str], frozen_layers: int, boundary: int | None = None,
                 progress: bool = True, batch_size: int = 64, memory_cap: int | None = None) -> None:
        super().__init__(model, texts)
        self.frozen_layers = frozen_layers
        self.boundary = frozen_layers if boundary is None else min(boundary, frozen_layers)
        self.states = prefix_cache.prefix_states(self.tokens, self.boundary, model.device, progress, batch_size,
                                                 memory_cap)

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        backbone, device = self.model.backbone, self.model.device
        hidden, mask = self.states.packed.pad(idx)
        hidden, mask = hidden.to(device=device, dtype=torch.float32), mask.to(device=device, dtype=torch.long)
        if self.frozen_layers > self.boundary:
            with torch.no_grad():
                hidden = bb.run_layers(backbone, hidden, mask, self.boundary, self.frozen_layers)
        return bb.pool(backbone, bb.run_layers(backbone, hidden, mask, self.frozen_layers), mask)


class CachedEmbeddings:
    """The backbone is frozen: look the sentence embeddings up."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str], progress: bool = True) -> None:
        self.embeddings = embedding_store.lookup(model.backbone, list(texts), progress=progress)
        self.lengths = np.array([len(t) for t in texts])  # characters: enough to group similar lengths

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        return self.embeddings[torch.as_tensor(np.asarray(idx))]


def sentence_source(model: MultiTaskModel, texts: Sequence[str], use_cache: bool = True, progress: bool = True,
                    prefix_boundary: int | None = None):
    """The cheapest exact way to get sentence embeddings for `texts` under the model's current freezing."""
    if not use_cache:
        return FullForward(model, texts)
    if bb.nothing_trains(model.backbone):
        return CachedEmbeddings(model, texts, progress=progress)
    depth = bb.frozen_depth(model.backbone)  # bottom stages in which nothing trains
    if depth == 0:
        return FullForward(model, texts)
    return CachedPrefix(model, texts, frozen_layers=depth - 1, boundary=prefix_boundary, progress=progress)


def clear_memory_cache() -> None:
    """Forget every in-memory cache entry (the disk cache stays)."""
    embedding_store.clear()
    prefix_cache.clear()
