"""How a batch of sentences becomes sentence embeddings during training, cheaply on a CPU.

Three sources, picked from what is frozen:

- `FullForward`: tokenise and run the whole backbone (something in the embeddings trains);
- `CachedPrefix`: the frozen bottom of the backbone ran once; each batch runs only the top layers;
- `CachedEmbeddings`: the backbone is frozen; its sentence embeddings were computed once (memory + disk).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from . import freezing
from .cache import atomic_path, cache_dir, fingerprint, texts_key
from .model import MultiTaskModel, check_texts, length_order

_MEMORY: OrderedDict[str, object] = OrderedDict()
_MEMORY_ENTRIES = 6  # a handful of (backbone, dataset) entries; the prefix states are the big ones


def _remember(key: str, build):
    """A small in-memory LRU shared by every source, so a rerun with the same frozen weights is free."""
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    value = build()
    _MEMORY[key] = value
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return value


def clear_memory_cache() -> None:
    """Forget every in-memory cache entry (the disk cache stays)."""
    _MEMORY.clear()


def _backbone_key(backbone: SentenceTransformer, modules: Sequence[torch.nn.Module] | None = None) -> str:
    tensors = [(n, t) for m in (modules or [backbone]) for n, t in m.state_dict().items()]
    return fingerprint(tensors, backbone.max_seq_length)


def _tokenize(backbone: SentenceTransformer, texts: list[str], batch_size: int = 256) -> list[dict[str, torch.Tensor]]:
    """Tokenise every text once, unpadded: one dict of 1-D tensors per text."""
    out = []
    for start in range(0, len(texts), batch_size):
        features = backbone.preprocess(texts[start:start + batch_size])
        mask = features["attention_mask"]
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        for row in range(mask.shape[0]):
            n = int(mask[row].sum())
            out.append({k: v[row, :n].clone() for k, v in tensors.items()})
    return out


def _pad(tokens: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad unpadded token dicts to the longest one, as the tokenizer would (right padding)."""
    longest = max(len(t["input_ids"]) for t in tokens)
    batch = {}
    for key in tokens[0]:
        fill = pad_id if key == "input_ids" else 0
        padded = torch.full((len(tokens), longest), fill, dtype=tokens[0][key].dtype)
        for row, t in enumerate(tokens):
            padded[row, :len(t[key])] = t[key]
        batch[key] = padded
    return batch


@torch.no_grad()
def cached_embeddings(backbone: SentenceTransformer, texts: Sequence[str], batch_size: int = 64,
                      progress: bool = True, disk: bool = True) -> torch.Tensor:
    """Sentence embeddings of `texts` under this exact backbone, computed once then read from memory or disk."""
    texts = check_texts(texts)
    key = f"emb-{_backbone_key(backbone)}-{texts_key(texts)}"

    def build() -> torch.Tensor:
        path = cache_dir("embeddings") / f"{key}.safetensors"
        if disk and path.is_file():
            try:
                stored = load_file(path)["embeddings"]
                if stored.shape[0] == len(texts):
                    return stored
            except Exception:  # a corrupt entry is rebuilt, never used
                pass
        was_training = backbone.training
        backbone.eval()
        order = length_order([len(t) for t in texts])
        out = torch.empty(len(texts), backbone.get_embedding_dimension())
        for start in tqdm(range(0, len(texts), batch_size), desc="encoding (cached after)", disable=not progress):
            idx = order[start:start + batch_size]
            features = backbone.preprocess([texts[i] for i in idx])
            features = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            out[torch.as_tensor(idx)] = backbone(features)["sentence_embedding"].float().cpu()
        backbone.train(was_training)
        if disk:
            with atomic_path(path) as tmp:
                save_file({"embeddings": out.contiguous()}, str(tmp))
        return out

    return _remember(key, build).to(backbone.device)


@contextlib.contextmanager
def run_layers(backbone: SentenceTransformer, start: int, stop: int | None = None,
               hidden: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the backbone runs only transformer layers [start:stop].

    With `hidden`, the embeddings' output is replaced by these cached hidden states, so the
    backbone's own mask handling, pooling and normalisation run unchanged on top of them.
    """
    auto = backbone[0].auto_model
    layers = auto.encoder.layer
    handle = None
    auto.encoder.layer = layers[start:stop]
    if hidden is not None:
        handle = auto.embeddings.register_forward_hook(lambda module, args, output: hidden)
    try:
        yield
    finally:
        auto.encoder.layer = layers
        if handle is not None:
            handle.remove()


class FullForward:
    """Tokenise once, then run the whole backbone on every batch."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str]) -> None:
        self.model = model
        self.tokens = _tokenize(model.backbone, check_texts(texts))
        self.lengths = np.array([len(t["input_ids"]) for t in self.tokens])
        self.pad_id = model.backbone.tokenizer.pad_token_id or 0

    def batch_features(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = _pad([self.tokens[i] for i in idx], self.pad_id)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        """Sentence embeddings of the texts at `idx`."""
        return self.model.sentence_embeddings(self.batch_features(idx))


class CachedPrefix(FullForward):
    """The frozen embeddings and bottom layers ran once per text; each batch runs only the layers that train."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str], frozen_layers: int, progress: bool = True,
                 batch_size: int = 64) -> None:
        super().__init__(model, texts)
        self.frozen_layers = frozen_layers
        stages = freezing.backbone_stages(model)[: frozen_layers + 1]
        key = (f"prefix-{_backbone_key(model.backbone, [m for _, mods in stages for m in mods])}"
               f"-{frozen_layers}-{texts_key([*texts])}")
        self.states = _remember(key, lambda: self._compute(progress, batch_size))

    @torch.no_grad()
    def _compute(self, progress: bool, batch_size: int) -> list[torch.Tensor]:
        backbone = self.model.backbone
        was_training = backbone.training
        backbone.eval()
        states: list[torch.Tensor | None] = [None] * len(self.tokens)
        order = length_order(self.lengths)
        with run_layers(backbone, 0, self.frozen_layers):
            for start in tqdm(range(0, len(order), batch_size), desc=f"caching {self.frozen_layers} frozen layers",
                              disable=not progress):
                idx = order[start:start + batch_size]
                hidden = backbone[0](self.batch_features(idx))["token_embeddings"].cpu()
                for row, i in enumerate(idx):
                    states[i] = hidden[row, : self.lengths[i]].clone()
        backbone.train(was_training)
        return states  # type: ignore[return-value]

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        features = self.batch_features(idx)
        longest = features["input_ids"].shape[1]
        hidden = torch.zeros(len(idx), longest, self.states[idx[0]].shape[-1])
        for row, i in enumerate(idx):
            hidden[row, : self.lengths[i]] = self.states[i]
        with run_layers(self.model.backbone, self.frozen_layers, None, hidden.to(self.model.device)):
            return self.model.sentence_embeddings(features)


class CachedEmbeddings:
    """The backbone is frozen: look the sentence embeddings up."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str], progress: bool = True) -> None:
        self.embeddings = cached_embeddings(model.backbone, texts, progress=progress)
        self.lengths = np.array([len(t) for t in texts])  # characters: enough to group similar lengths

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        return self.embeddings[torch.as_tensor(np.asarray(idx))]


def sentence_source(model: MultiTaskModel, texts: Sequence[str], use_cache: bool = True, progress: bool = True):
    """The cheapest exact way to get sentence embeddings for `texts` under the model's current freezing."""
    if not use_cache:
        return FullForward(model, texts)
    if freezing.backbone_frozen(model):
        return CachedEmbeddings(model, texts, progress=progress)
    depth = freezing.frozen_prefix_depth(model)
    if depth == 0:
        return FullForward(model, texts)
    return CachedPrefix(model, texts, frozen_layers=depth - 1, progress=progress)
