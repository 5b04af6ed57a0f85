"""The frozen-prefix cache: hidden states after the frozen bottom layers of the backbone, computed once per text.

Makes it faster, changes no number: when only the top layers train, the frozen layers below them give every
text the same hidden states in every epoch, so they run once and each batch runs only the layers above. The
states live in memory in 16 bits, one packed tensor, and move to a memory-mapped file on disk beyond a memory
cap. Exactness is checked once per cache against the whole backbone (`backbone.check_layer_running`).
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import backbone as bb
from .embedding_store import precision, texts_key
from .model import map_batches, to_device
from .offline.cache import cache_dir, clean_stale, fingerprint, process_alive, writer_tag

PREFIX_MEMORY_ENV = "MTL_UTILS_PREFIX_MEMORY_GB"
PREFIX_MEMORY_FRACTION = 0.25  # of the machine's memory, for all in-memory prefix states together


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


class Tokens:
    """Every text tokenised once, unpadded and packed; `batch(idx)` pads the texts at `idx` as the tokenizer pads."""

    def __init__(self, backbone: SentenceTransformer, texts: list[str], batch_size: int = 256) -> None:
        self.backbone, self.texts = backbone, texts
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
        self.packed = {key: Packed(torch.cat(chunks), n) for key, chunks in parts.items()}
        self.lengths = self.packed["input_ids"].lengths
        self.pad_id = bb.pad_id(backbone)

    def batch(self, idx: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The texts at `idx` tokenised and right-padded to the longest of them, on `device`."""
        return to_device({key: packed.pad(idx, self.pad_id if key == "input_ids" else 0)[0]
                          for key, packed in self.packed.items()}, device)


class PrefixStates:
    """The hidden states after the bottom `boundary` layers of every text, packed, in 16 bits.

    fp16 keeps 11 bits of mantissa (bf16 only 8), so it is the default; an entry with values beyond fp16's
    range is built again in bf16. When the states would not fit in `memory_left` bytes, they live in a
    memory-mapped file in the cache folder instead (deleted when the entry is dropped).
    """

    def __init__(self, tokens: Tokens, boundary: int, device: torch.device, progress: bool, batch_size: int,
                 memory_left: int) -> None:
        self.boundary = boundary
        self.file: Path | None = None
        total, width = int(tokens.lengths.sum()), bb.hidden_size(tokens.backbone)
        self.nbytes = total * width * 2
        if self.nbytes > memory_left:
            folder = cache_dir("prefix")
            clean_spilled(folder)
            # named after this process: clean_stale removes it once the process is gone (killed or not)
            self.file = folder / f".states.{writer_tag()}.{uuid.uuid4().hex}.tmp"
        states = self._build(tokens, device, total, width, torch.float16, progress, batch_size)
        if states is None:  # fp16 would have turned some values into inf
            states = self._build(tokens, device, total, width, torch.bfloat16, False, batch_size)
        self.packed = Packed(states, tokens.lengths)

    def _build(self, tokens: Tokens, device: torch.device, total: int, width: int, dtype: torch.dtype, progress: bool,
               batch_size: int) -> torch.Tensor | None:
        backbone = tokens.backbone
        if self.file is not None:
            states = torch.from_file(str(self.file), shared=True, size=total * width, dtype=dtype).view(total, width)
        else:
            states = torch.empty(total, width, dtype=dtype)
        offsets = tokens.packed["input_ids"].offsets
        fits, checked = [True], [False]

        def run(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            features = tokens.batch(idx, device)
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

        map_batches(run, tokens.lengths, batch_size, module=backbone, progress=progress,
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


def prefix_states(tokens: Tokens, boundary: int, device: torch.device, progress: bool = True, batch_size: int = 64,
                  memory_cap: int | None = None) -> PrefixStates:
    """The states after the bottom `boundary` layers of the texts, from memory or computed now."""
    backbone, texts = tokens.backbone, tokens.texts
    stages = bb.stages(backbone)[: boundary + 1]
    weights = [(n, t) for _, modules in stages for m in modules for n, t in m.state_dict().items()]
    key = f"{fingerprint(weights, bb.architecture(backbone))}-{precision(device)}-{boundary}-{texts_key(texts)}"
    if key not in _PREFIXES:
        cap = prefix_memory_cap() if memory_cap is None else memory_cap
        in_memory = sum(p.nbytes for p in _PREFIXES.values() if p.file is None)
        _PREFIXES[key] = PrefixStates(tokens, boundary, device, progress, batch_size, cap - in_memory)
        while len(_PREFIXES) > _MAX_PREFIXES:
            _PREFIXES.popitem(last=False)[1].release()
    _PREFIXES.move_to_end(key)
    return _PREFIXES[key]


def clear() -> None:
    """Forget the prefix states kept in memory."""
    _PREFIXES.clear()
