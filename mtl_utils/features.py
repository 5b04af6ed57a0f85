"""How a batch of sentences becomes sentence embeddings during training, cheaply on a CPU.

Three sources, picked from what is frozen:

- `FullForward`: tokenise once, run the whole backbone on every batch (something in the embeddings trains);
- `CachedPrefix`: the frozen bottom of the backbone ran once per sentence; each batch runs only the layers
  above it (the frozen ones between the cached boundary and the trainable ones without gradients);
- `CachedEmbeddings`: the backbone is frozen; each sentence's embedding was computed once, ever.

Sentence embeddings are cached per sentence, on disk, keyed by the backbone's fingerprint and the sentence
itself: a new split, a sample or a second task over sentences already seen encodes nothing again. Each
stored shard carries its shape, dtype and checksum and is dropped (its sentences encoded again) when it
does not match them. The frozen-prefix states live in memory in 16 bits, one packed tensor, and move to a
memory-mapped file on disk beyond a memory cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from . import backbone as bb
from . import freezing
from .data import check_texts
from .model import MultiTaskModel, map_batches
from .offline.cache import atomic_path, cache_dir, clean_stale, fingerprint, process_alive, writer_tag

PREFIX_MEMORY_ENV = "MTL_UTILS_PREFIX_MEMORY_GB"
PREFIX_MEMORY_FRACTION = 0.25  # of the machine's memory, for all in-memory prefix states together
_MAX_SHARDS = 16  # an embedding store merges its shards into one beyond this many


# --- keys ---------------------------------------------------------------------------------------------------

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def backbone_key(backbone: SentenceTransformer) -> str:
    """A fingerprint of everything that decides a sentence embedding: the weights, every module's settings
    (pooling mode, normalisation, ...), the maximum length and the tokenizer.

    Hashing 100 M weights takes a while, so the key is remembered per backbone object until a weight changes
    (PyTorch counts every in-place change of a tensor in its version counter) or a module is swapped.
    """
    state = (tuple((t.data_ptr(), t._version) for t in backbone.state_dict().values()),
             tuple(id(m) for m in backbone.children()), backbone.max_seq_length, id(backbone.tokenizer))
    known = _KEYS.get(backbone)
    if known is not None and known[0] == state:
        return known[1]
    key = _backbone_key(backbone)
    _KEYS[backbone] = (state, key)
    return key


def _backbone_key(backbone: SentenceTransformer) -> str:
    tokenizer = backbone.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    pipeline = [(type(m).__name__, _settings(m)) for m in backbone.children()]
    return fingerprint(backbone.state_dict().items(), pipeline, backbone.max_seq_length, type(tokenizer).__name__,
                       vocab, getattr(tokenizer, "do_lower_case", None))


def _settings(module: torch.nn.Module) -> object:
    getter = getattr(module, "get_config_dict", None)
    if getter is None:
        return None
    return {k: v for k, v in getter().items() if "path" not in k.lower()}  # settings, not where it was loaded from


def precision(device: torch.device) -> str:
    """The arithmetic the backbone runs in right now on `device`: "fp32", or the autocast dtype in force.

    Part of every cache key: entries computed under bf16 autocast are another model's numbers, and an fp32 run
    must never read them (the weights' own dtype is already in the backbone's fingerprint).
    """
    if torch.is_autocast_enabled(device.type):
        return f"autocast-{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')}"
    return "fp32"


def text_hash(text: str) -> bytes:
    """16 bytes that name one sentence (BLAKE2b of its UTF-8 bytes)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def texts_key(texts: Sequence[str]) -> str:
    """A short key of an ordered list of texts; two different lists never share it (each text is length-prefixed)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


# --- the per-sentence embedding store -----------------------------------------------------------------------

class EmbeddingStore:
    """Every sentence embedding one backbone has computed: rows in memory, shards on disk.

    A shard is a safetensors file with `keys` (n, 16) uint8 text hashes and `embeddings` (n, dim) float32,
    and in its metadata the store's key (backbone and precision), the shape, dtype and SHA-256 of both; a shard
    that does not match them (damaged, or copied from another backbone's store) is deleted.
    """

    def __init__(self, key: str, dim: int, disk: bool = True) -> None:
        self.key, self.dim, self.disk = key, dim, disk
        self.rows: dict[bytes, int] = {}
        self.data = torch.empty(0, dim)
        self.seen: set[str] = set()  # shard files already read
        self.dropped: list[str] = []  # shards that failed verification (for the message and the tests)

    @property
    def folder(self) -> Path:
        return cache_dir("embeddings", self.key)

    def __contains__(self, key: bytes) -> bool:
        return key in self.rows

    def refresh(self) -> None:
        """Read the shards other processes (or earlier runs) wrote since the last look."""
        if not self.disk:
            return
        for path in self._shards():
            if path.name in self.seen:
                continue
            loaded = self._read(path)
            self.seen.add(path.name)
            if loaded is not None:
                self._add(*loaded)

    def _shards(self) -> list[Path]:
        """The shard files (something else named like one, e.g. a folder, is not ours: left alone, unread)."""
        return sorted(p for p in self.folder.glob("shard-*.safetensors") if p.is_file() and not p.is_symlink())

    def _read(self, path: Path) -> tuple[list[bytes], torch.Tensor] | None:
        """A shard's hashes and embeddings, or None (and the shard deleted) when it is not what it says it is."""
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            meta = json.loads(header["__metadata__"]["check"])
            keys, emb = tensors["keys"], tensors["embeddings"]
            ok = (meta.get("store") == self.key
                  and list(emb.shape) == meta["shape"] and str(emb.dtype) == meta["dtype"] == "torch.float32"
                  and emb.shape[1] == self.dim and keys.shape == (emb.shape[0], 16)
                  and _digest(keys, emb) == meta["sha256"] and bool(torch.isfinite(emb).all()))
        except FileNotFoundError:
            return None  # merged away by another process meanwhile: its rows are in the merged shard
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, json.JSONDecodeError):
            ok = False
        if not ok:
            self.dropped.append(path.name)
            warnings.warn(f"embedding cache: {path.name} of backbone {self.key} is damaged or belongs to another "
                          "backbone (its store, shape, dtype or checksum does not match); deleted, its sentences will "
                          "be encoded again", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        return [bytes(k) for k in keys.numpy()], emb

    def _add(self, keys: list[bytes], emb: torch.Tensor) -> None:
        new = [i for i, k in enumerate(keys) if k not in self.rows]
        if not new:
            return
        start = len(self.data)
        self.data = torch.cat([self.data, emb[new]])
        for offset, i in enumerate(new):
            self.rows[keys[i]] = start + offset

    def add(self, keys: list[bytes], emb: torch.Tensor) -> None:
        """Keep new rows in memory and write them as one new shard (merging the shards when there are many)."""
        emb = emb.detach().float().cpu().contiguous()
        self._add(keys, emb)
        if self.disk:
            self._write(keys, emb)
            shards = self._shards()
            if len(shards) > _MAX_SHARDS:
                self._merge(shards)

    def _write(self, keys: list[bytes], emb: torch.Tensor) -> str:
        key_tensor = torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16).copy())
        check = {"store": self.key, "shape": list(emb.shape), "dtype": str(emb.dtype),
                 "sha256": _digest(key_tensor, emb)}
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file({"keys": key_tensor, "embeddings": emb}, str(tmp), metadata={"check": json.dumps(check)})
        self.seen.add(name)
        return name

    def _merge(self, shards: list[Path]) -> None:
        """All rows in one new shard, then the old shards removed (readers of a removed one find its rows again)."""
        self.refresh()
        keys = list(self.rows)
        self._write(keys, self.data[[self.rows[k] for k in keys]])
        for path in shards:
            path.unlink(missing_ok=True)

    def get(self, keys: list[bytes]) -> torch.Tensor:
        return self.data[torch.as_tensor([self.rows[k] for k in keys], dtype=torch.long)]


def _digest(keys: torch.Tensor, emb: torch.Tensor) -> str:
    digest = hashlib.sha256(keys.contiguous().numpy().tobytes())
    digest.update(emb.contiguous().numpy().tobytes())
    return digest.hexdigest()


_STORES: OrderedDict[tuple[str, bool], EmbeddingStore] = OrderedDict()
_MAX_STORES = 4


def embedding_store(backbone: SentenceTransformer, disk: bool = True) -> EmbeddingStore:
    """The store of this exact backbone (weights and pipeline) in the precision in force; kept in memory for the
    last few backbones."""
    key = (f"{backbone_key(backbone)}-{precision(backbone.device)}", disk)
    if key not in _STORES:
        _STORES[key] = EmbeddingStore(key[0], backbone.get_embedding_dimension(), disk)
        while len(_STORES) > _MAX_STORES:
            _STORES.popitem(last=False)
    _STORES.move_to_end(key)
    return _STORES[key]


def cached_embeddings(backbone: SentenceTransformer, texts: Sequence[str], batch_size: int = 64,
                      progress: bool = True, disk: bool = True) -> torch.Tensor:
    """Sentence embeddings of `texts` under this exact backbone: only sentences never seen before are encoded."""
    texts = check_texts(texts)
    store = embedding_store(backbone, disk)
    keys = [text_hash(t) for t in texts]
    if any(k not in store for k in keys):
        store.refresh()
    todo: dict[bytes, str] = {}
    for k, t in zip(keys, texts):
        if k not in store:
            todo.setdefault(k, t)
    if todo:
        new = list(todo.values())

        def encode(idx: np.ndarray) -> torch.Tensor:
            features = _to(backbone.preprocess([new[i] for i in idx]), backbone.device)
            return backbone(features)["sentence_embedding"].float().cpu()

        store.add(list(todo), map_batches(encode, [len(t) for t in new], batch_size, module=backbone,
                                          progress=progress, desc="encoding (cached after)"))
    return store.get(keys).to(backbone.device)


def clear_memory_cache() -> None:
    """Forget every in-memory cache entry (the disk cache stays)."""
    _STORES.clear()
    _PREFIXES.clear()


def _to(features: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


# --- packed rows ------------------------------------------------------------------------------------------

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
    n = torch.cat(lengths).numpy()
    return {key: Packed(torch.cat(chunks), n) for key, chunks in parts.items()}


# --- the sources --------------------------------------------------------------------------------------------

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
        return _to(batch, self.model.device)

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        """Sentence embeddings of the texts at `idx`."""
        return self.model.sentence_embeddings(self.batch_features(idx))


class PrefixStates:
    """The hidden states after the bottom `boundary` layers of every text, packed, in 16 bits.

    fp16 keeps 11 bits of mantissa (bf16 only 8), so it is the default; an entry with values beyond fp16's
    range is built again in bf16. When the states would not fit in `memory_left` bytes, they live in a
    memory-mapped file in the cache folder instead (deleted when the entry is dropped).
    """

    def __init__(self, source: FullForward, boundary: int, progress: bool, batch_size: int, memory_left: int) -> None:
        self.boundary = boundary
        self.file: Path | None = None
        total, width = int(source.lengths.sum()), bb.hidden_size(source.model.backbone)
        self.nbytes = total * width * 2
        if self.nbytes > memory_left:
            folder = cache_dir("prefix")
            clean_spilled(folder)
            # named after this process: clean_stale removes it once the process is gone (killed or not)
            self.file = folder / f".states.{writer_tag()}.{uuid.uuid4().hex}.tmp"
        states = self._build(source, total, width, torch.float16, progress, batch_size)
        if states is None:  # fp16 would have turned some values into inf
            states = self._build(source, total, width, torch.bfloat16, False, batch_size)
        self.packed = Packed(states, source.lengths)

    def _build(self, source: FullForward, total: int, width: int, dtype: torch.dtype, progress: bool,
               batch_size: int) -> torch.Tensor | None:
        backbone = source.model.backbone
        if self.file is not None:
            states = torch.from_file(str(self.file), shared=True, size=total * width, dtype=dtype).view(total, width)
        else:
            states = torch.empty(total, width, dtype=dtype)
        offsets = source.tokens["input_ids"].offsets
        fits, checked = [True], [False]

        def run(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            features = source.batch_features(idx)
            if not checked[0]:  # once per cache: running layers by range must match the whole backbone
                bb.check_layer_running(backbone, features)
                checked[0] = True
            mask = features["attention_mask"]
            return bb.run_layers(backbone, bb.embed_tokens(backbone, features), mask, 0, self.boundary).cpu(), mask

        def keep(idx: np.ndarray, result: tuple[torch.Tensor, torch.Tensor]) -> None:
            hidden, mask = result
            mask = mask.cpu().bool()
            rows = hidden[mask].to(dtype)
            fits[0] = fits[0] and bool(torch.isfinite(rows).all())
            where = offsets[torch.as_tensor(idx)][:, None] + torch.arange(mask.shape[1])
            states[where[mask]] = rows

        map_batches(run, source.lengths, batch_size, module=backbone, progress=progress,
                    desc=f"caching {self.boundary} frozen layers", into=keep)
        return states if fits[0] else None

    def release(self) -> None:
        """Delete the memory-mapped file, if there is one."""
        if self.file is not None:
            self.file.unlink(missing_ok=True)

    def __del__(self) -> None:
        self.release()


_OLD_SPILL = re.compile(r"^states-(?P<pid>\d+)-[0-9a-f]+\.bin$")  # how versions before 2026-12 named them


def clean_spilled(folder: Path) -> None:
    """Remove the spilled prefix states of processes that are gone (a killed run leaves gigabytes behind)."""
    clean_stale(folder)
    for path in folder.glob("states-*.bin"):
        match = _OLD_SPILL.match(path.name)
        if match and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def prefix_memory_cap() -> int:
    """Bytes of prefix states kept in memory: `$MTL_UTILS_PREFIX_MEMORY_GB`, else a quarter of the machine's memory."""
    if os.environ.get(PREFIX_MEMORY_ENV):
        return int(float(os.environ[PREFIX_MEMORY_ENV]) * 2**30)
    import psutil

    return int(psutil.virtual_memory().total * PREFIX_MEMORY_FRACTION)


_PREFIXES: OrderedDict[str, PrefixStates] = OrderedDict()
_MAX_PREFIXES = 8  # a few (backbone, texts, boundary) entries: train and validation of two tasks, twice


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
        stages = bb.stages(model.backbone)[: self.boundary + 1]
        weights = [(n, t) for _, modules in stages for m in modules for n, t in m.state_dict().items()]
        key = (f"{fingerprint(weights, bb.architecture(model.backbone))}-{precision(model.device)}-{self.boundary}-"
               f"{texts_key(list(texts))}")
        if key not in _PREFIXES:
            cap = prefix_memory_cap() if memory_cap is None else memory_cap
            in_memory = sum(p.nbytes for p in _PREFIXES.values() if p.file is None)
            _PREFIXES[key] = PrefixStates(self, self.boundary, progress, batch_size, cap - in_memory)
            while len(_PREFIXES) > _MAX_PREFIXES:
                _PREFIXES.popitem(last=False)[1].release()
        _PREFIXES.move_to_end(key)
        self.states = _PREFIXES[key]

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
        self.embeddings = cached_embeddings(model.backbone, texts, progress=progress)
        self.lengths = np.array([len(t) for t in texts])  # characters: enough to group similar lengths

    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        return self.embeddings[torch.as_tensor(np.asarray(idx))]


def sentence_source(model: MultiTaskModel, texts: Sequence[str], use_cache: bool = True, progress: bool = True,
                    prefix_boundary: int | None = None):
    """The cheapest exact way to get sentence embeddings for `texts` under the model's current freezing."""
    if not use_cache:
        return FullForward(model, texts)
    if freezing.backbone_frozen(model):
        return CachedEmbeddings(model, texts, progress=progress)
    depth = freezing.frozen_prefix_depth(model)
    if depth == 0:
        return FullForward(model, texts)
    return CachedPrefix(model, texts, frozen_layers=depth - 1, boundary=prefix_boundary, progress=progress)
