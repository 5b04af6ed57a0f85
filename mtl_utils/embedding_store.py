"""The per-sentence embedding store: every sentence embedding a backbone has computed, kept on disk.

Makes it faster, changes no number: a frozen backbone gives a sentence the same embedding every time, so it is
computed once, ever, and looked up after. Entries are keyed by the backbone's fingerprint (weights, modules,
tokenizer), the precision in force and the sentence itself: a new split, a sample or a second task over
sentences already seen encodes nothing again. Each stored shard carries its shape, dtype and checksum and is
dropped (its sentences encoded again) when it does not match them.
"""

from __future__ import annotations

import hashlib
import json
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
from .data import check_texts
from .model import map_batches, to_device
from .offline.cache import atomic_path, cache_dir, fingerprint

_MAX_SHARDS = 16  # a store merges its shards into one beyond this many


# --- keys ---------------------------------------------------------------------------------------------------

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def backbone_key(backbone: SentenceTransformer) -> str:
    """A fingerprint of everything that decides a sentence embedding: the weights, every module's settings
    (pooling mode, normalisation, ...), the maximum length and the tokenizer.

    Hashing 100 M weights takes a while, so the key is remembered per backbone object until a weight changes
    (PyTorch counts every in-place change of a tensor in its version counter) or a module is swapped.
    """
    state = (tuple((t.data_ptr(), t._version) for t in backbone.state_dict().values()),
             tuple(id(m) for m in backbone.children()), backbone.max_seq_length, id(bb.tokenizer_of(backbone)))
    known = _KEYS.get(backbone)
    if known is not None and known[0] == state:
        return known[1]
    key = _backbone_key(backbone)
    _KEYS[backbone] = (state, key)
    return key


def _backbone_key(backbone: SentenceTransformer) -> str:
    pipeline = [(type(m).__name__, _settings(m)) for m in backbone.children()]
    return fingerprint(backbone.state_dict().items(), pipeline, backbone.max_seq_length,
                       *bb.tokenizer_settings(backbone))


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


# --- the store ----------------------------------------------------------------------------------------------

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
    return lookup(backbone, check_texts(texts), batch_size, progress, disk)


def lookup(backbone: SentenceTransformer, texts: list[str], batch_size: int = 64, progress: bool = True,
           disk: bool = True) -> torch.Tensor:
    """`cached_embeddings` for texts already checked (a Task's)."""
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
            features = to_device(backbone.preprocess([new[i] for i in idx]), backbone.device)
            return backbone(features)["sentence_embedding"].float().cpu()

        store.add(list(todo), map_batches(encode, [len(t) for t in new], batch_size, module=backbone,
                                          progress=progress, desc="encoding (cached after)"))
    return store.get(keys).to(backbone.device)


def clear() -> None:
    """Forget the stores kept in memory (the disk stays)."""
    _STORES.clear()
