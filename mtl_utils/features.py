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


class Packed:
    """Variable-length rows stored end to end in one tensor, cut at `offsets`; `pad` gathers a padded batch.

    One tensor instead of one per sentence: far fewer objects to keep in memory, and a padded batch is a
    single index operation rather than a Python loop of row copies.
    """

    def __init__(self, data: torch.Tensor, lengths: np.ndarray) -> None:
        self.data = data  # (sum of lengths, *feature shape)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(self.lengths)])[:-1].astype(np.int64))
        self._lengths = torch.from_numpy(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> torch.Tensor:
        start = int(self.offsets[i])
        return self.data[start:start + int(self.lengths[i])]

    def pad(self, idx: Sequence[int], fill: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` right-padded with `fill` to the longest of them, and the boolean mask of real positions."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        lengths = self._lengths[idx]
        positions = torch.arange(int(lengths.max()))
        mask = positions < lengths[:, None]
        gather = torch.where(mask, self.offsets[idx][:, None] + positions, 0)
        out = self.data[gather.reshape(-1)].reshape(*gather.shape, *self.data.shape[1:])
        padding = ~mask.reshape(*mask.shape, *[1] * (out.dim() - 2))
        return out.masked_fill_(padding, fill), mask


def _tokenize(backbone: SentenceTransformer, texts: list[str], batch_size: int = 256) -> dict[str, Packed]:
    """Tokenise every text once, unpadded: per feature (input_ids, attention_mask, ...) all texts end to end."""
    parts: dict[str, list[torch.Tensor]] = {}
    lengths = []
    for start in range(0, len(texts), batch_size):
        features = backbone.preprocess(texts[start:start + batch_size])
        mask = features["attention_mask"].bool()
        lengths.append(mask.sum(1))
        for key, value in features.items():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                parts.setdefault(key, []).append(value[mask])  # row by row, real tokens only (right padding)
    if not texts:
        return {"input_ids": Packed(torch.zeros(0, dtype=torch.long), np.zeros(0, dtype=np.int64))}
    n = torch.cat(lengths).numpy()
    return {key: Packed(torch.cat(chunks), n) for key, chunks in parts.items()}


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule gets back its own mode (frozen parts stay in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
        order = length_order([len(t) for t in texts])
        out = torch.empty(len(texts), backbone.get_embedding_dimension())
        with eval_mode(backbone):
            for start in tqdm(range(0, len(texts), batch_size), desc="encoding (cached after)",
                              disable=not progress):
                idx = order[start:start + batch_size]
                features = backbone.preprocess([texts[i] for i in idx])
                features = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
                out[torch.as_tensor(idx)] = backbone(features)["sentence_embedding"].float().cpu()
        if disk:
            with atomic_path(path) as tmp:
                save_file({"embeddings": out.contiguous()}, str(tmp))
        return out

    return _remember(key, build).to(backbone.device)


@contextlib.contextmanager
def run_layers(backbone: SentenceTransformer, start: int, stop: int | None = None,
               hidden: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the backbone runs only transformer layers [start:stop].

    With `hidden`, the embeddings module is not run at all: these cached hidden states stand in for
    its output, so the backbone's own mask handling, pooling and normalisation run unchanged on top of them.
    """
    auto = backbone[0].auto_model
    layers = auto.encoder.layer
    embeddings = auto.embeddings
    shadowed = embeddings.__dict__.get("forward")
    auto.encoder.layer = layers[start:stop]
    if hidden is not None:
        # an instance attribute shadows the class's forward; forward hooks registered elsewhere still run
        embeddings.forward = lambda *args, **kwargs: hidden
    try:
        yield
    finally:
        auto.encoder.layer = layers
        if hidden is not None:
            del embeddings.forward
            if shadowed is not None:
                embeddings.forward = shadowed


class FullForward:
    """Tokenise once, then run the whole backbone on every batch."""

    def __init__(self, model: MultiTaskModel, texts: Sequence[str]) -> None:
        self.model = model
        self.tokens = _tokenize(model.backbone, check_texts(texts))
        self.lengths = self.tokens["input_ids"].lengths
        self.pad_id = model.backbone.tokenizer.pad_token_id or 0

    def batch_features(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The texts at `idx` tokenised and right-padded to the longest of them, as the tokenizer pads."""
        batch = {key: packed.pad(idx, self.pad_id if key == "input_ids" else 0)[0]
                 for key, packed in self.tokens.items()}
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        """Sentence embeddings of the texts at `idx`."""
        return self.model.sentence_embeddings(self.batch_features(idx))


class CachedPrefix(FullForward):
    """The frozen embeddings and bottom layers ran once per text; each batch runs only the layers that train.

    The cached hidden states of all texts are stored end to end in one tensor (`Packed`), so a batch is one
    gather; the embeddings module and the frozen layers never run during training.
    """

    def __init__(self, model: MultiTaskModel, texts: Sequence[str], frozen_layers: int, progress: bool = True,
                 batch_size: int = 64) -> None:
        super().__init__(model, texts)
        self.frozen_layers = frozen_layers
        stages = freezing.backbone_stages(model)[: frozen_layers + 1]
        key = (f"prefix-{_backbone_key(model.backbone, [m for _, mods in stages for m in mods])}"
               f"-{frozen_layers}-{texts_key([*texts])}")
        self.states: Packed = _remember(key, lambda: self._compute(progress, batch_size))

    @torch.no_grad()
    def _compute(self, progress: bool, batch_size: int) -> Packed:
        backbone = self.model.backbone
        offsets = self.tokens["input_ids"].offsets
        states: torch.Tensor | None = None
        order = length_order(self.lengths)
        with eval_mode(backbone), run_layers(backbone, 0, self.frozen_layers):
            for start in tqdm(range(0, len(order), batch_size), desc=f"caching {self.frozen_layers} frozen layers",
                              disable=not progress):
                idx = order[start:start + batch_size]
                features = self.batch_features(idx)
                hidden = backbone[0](features)["token_embeddings"].cpu()
                if states is None:
                    states = hidden.new_empty(int(self.lengths.sum()), hidden.shape[-1])
                mask = features["attention_mask"].cpu().bool()
                where = offsets[torch.as_tensor(idx)][:, None] + torch.arange(mask.shape[1])
                states[where[mask]] = hidden[mask]
        if states is None:  # no texts
            states = torch.zeros(0, backbone[0].auto_model.config.hidden_size)
        return Packed(states, self.lengths)

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        features = self.batch_features(idx)
        hidden, _ = self.states.pad(idx)
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
