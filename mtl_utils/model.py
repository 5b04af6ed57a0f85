"""MultiTaskModel: one shared sentence-transformer backbone and one classification head per task.

Also the one batched inference loop every part of the library uses: length-sorted batches, eval mode, no
gradients, results back in input order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sentence_transformers import SentenceTransformer
from torch import nn
from tqdm.auto import tqdm

from . import backbone as bb
from . import checkpoint
from .data import check_label_names, check_task_name, check_texts
from .lora import backbone_weights, plain_name
from .recipes import HEAD_KINDS

Output = torch.Tensor | Sequence[torch.Tensor]


# --- the inference loop -----------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule gets back its own mode (frozen parts stay in eval)."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def to_device(features: Mapping, device: torch.device) -> dict:
    """Tokenised features with every tensor on `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def progress_bar(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar, unless `enabled` is False or TQDM_DISABLE=1 (`make run` and `make test` set it: no bars in
    saved notebooks)."""
    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, total=total, desc=desc, disable=off or not enabled, leave=False)


def length_order(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices from the longest to the shortest input (stable), so each batch carries little padding."""
    return np.argsort(-np.asarray(lengths), kind="stable")


@torch.no_grad()
def map_batches(fn: Callable[[np.ndarray], Output], lengths: Sequence[int] | np.ndarray, batch_size: int = 64,
                module: nn.Module | None = None, progress: bool = False, desc: str = "",
                into: Callable[[np.ndarray, Output], None] | None = None) -> Output | None:
    """Call `fn(idx)` on batches of indices, longest inputs first, without gradients and with `module` in eval
    mode; return its rows put back in input order (a tensor, or a list of tensors if `fn` returns several).

    With `into`, each batch's result goes to `into(idx, result)` instead (rows of different lengths).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    order = length_order(lengths)
    out: list[torch.Tensor] | None = None
    several = False
    with eval_mode(module):
        for start in progress_bar(range(0, len(order), batch_size), desc=desc, enabled=progress):
            idx = order[start:start + batch_size]
            result = fn(idx)
            if into is not None:
                into(idx, result)
                continue
            several = not isinstance(result, torch.Tensor)
            parts = list(result) if several else [result]
            if out is None:
                out = [torch.empty(len(order), *p.shape[1:], dtype=p.dtype, device=p.device) for p in parts]
            rows = torch.as_tensor(idx, device=parts[0].device)
            for store, part in zip(out, parts):
                store[rows] = part
    if into is not None or out is None:
        return None
    return out if several else out[0]


# --- heads and the model ----------------------------------------------------------------------------------

def make_head(dim: int, num_labels: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """A classification head: a linear layer, or a small MLP (linear, GELU, dropout, linear)."""
    if kind == "linear":
        return nn.Linear(dim, num_labels)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))
    raise ValueError(f"unknown head kind {kind!r}; known kinds are {', '.join(HEAD_KINDS)}")


class MultiTaskModel(nn.Module):
    """A shared SentenceTransformer backbone with a named head per task.

    `forward(task, inputs)` gives one task's logits from tokenised features or ready sentence embeddings;
    `predict(texts)` runs the backbone once and answers every task.
    """

    def __init__(
        self,
        backbone: SentenceTransformer,
        tasks: Mapping[str, Sequence[str]],
        head: str = "linear",
        hidden: int = 256,
        dropout: float = 0.1,
        seed: int = 0,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a MultiTaskModel needs at least one task: a mapping of task name -> label names")
        self.backbone = backbone
        self.backbone_name = backbone_name or getattr(backbone, "mtl_name", None) or "custom"
        if not isinstance(tasks, Mapping):
            raise TypeError(f"tasks must map each task name to its label names, got {type(tasks).__name__}")
        self.label_names = {check_task_name(task): check_label_names(labels, task) for task, labels in tasks.items()}
        self.head_config = {"kind": head, "hidden": hidden, "dropout": dropout, "seed": seed}
        self.embedding_dim = backbone.get_embedding_dimension()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # heads start the same whatever ran before
            self.heads = nn.ModuleDict({
                task: make_head(self.embedding_dim, len(labels), head, hidden, dropout)
                for task, labels in self.label_names.items()
            })
        # names of backbone parameters that have been trained; a checkpoint saves these and any other weight
        # changed since now (PyTorch counts every in-place change of a tensor in its version counter)
        self.tuned_backbone: set[str] = set()
        self.lora: dict | None = None  # the settings add_lora was given
        self.count_as_built()

    @property
    def tasks(self) -> list[str]:
        """The task names, in head order."""
        return list(self.heads)

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def head(self, task: str) -> nn.Module:
        """The head of one task, with a clear error for an unknown task."""
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model's tasks are: {', '.join(self.heads)}")
        return self.heads[task]

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """The units freezing works on: the backbone's stages (embeddings, each layer) and each head."""
        return [*bb.stages(self.backbone), *((f"head {t}", [h]) for t, h in self.heads.items())]

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Set training mode, but every part whose parameters are all frozen stays in eval mode (dropout off)."""
        super().train(mode)
        if mode:
            for _, modules in self.parts():
                if not any(p.requires_grad for m in modules for p in m.parameters()):
                    for m in modules:
                        m.eval()
            for m in bb.unused_modules(self.backbone):
                m.eval()
            if bb.nothing_trains(self.backbone):
                self.backbone.eval()
        return self

    def features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise texts (padded to the longest) on the model's device."""
        return to_device(self.backbone.preprocess(check_texts(texts)), self.device)

    def sentence_embeddings(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the backbone (tokens -> token embeddings -> pooling [-> normalise])."""
        return self.backbone(dict(features))["sentence_embedding"]

    def forward(self, task: str, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One task's logits, from tokenised features or from ready sentence embeddings."""
        head = self.head(task)
        embeddings = inputs if isinstance(inputs, torch.Tensor) else self.sentence_embeddings(inputs)
        return head(embeddings)

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Shared sentence embeddings of `texts`, in input order."""
        texts = check_texts(texts)
        return map_batches(lambda idx: self.sentence_embeddings(self.features([texts[i] for i in idx])),
                           [len(t) for t in texts], batch_size, module=self, progress=progress, desc="embed")

    def predict_embeddings(self, embeddings: torch.Tensor,
                           tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Class probabilities of every task (or of `tasks`) from sentence embeddings, heads in eval mode."""
        with torch.no_grad(), eval_mode(self):
            return {task: torch.softmax(self.head(task)(embeddings), dim=-1) for task in (tasks or self.tasks)}

    def predict(self, texts: Sequence[str], batch_size: int = 64, tasks: Sequence[str] | None = None) -> pd.DataFrame:
        """Run the backbone once and answer every task (or `tasks`): a label and per-label probabilities per text."""
        texts = check_texts(texts)
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a list of task names, got the str {tasks!r}; use tasks=[{tasks!r}]")
        tasks = self.tasks if tasks is None else list(tasks)
        if not tasks:
            raise ValueError(f"tasks=[] asks for no task; name some of {', '.join(self.tasks)}, or pass None for all")
        for task in tasks:
            self.head(task)  # an unknown task is a clear error before any work
        return probability_table(texts, self.predict_embeddings(self.embed(texts, batch_size), tasks), self.label_names)

    def count_as_built(self) -> None:
        """Count the backbone's weights as they are now as the ones it was built with (after a copy of equal values)."""
        self._built = {id(p): p._version for p in self.backbone.parameters()}

    def changed_backbone(self) -> set[str]:
        """Backbone weights (named as without adapters) that trained or changed in any way since the model was built."""
        tuned = {plain_name(n) for n in self.tuned_backbone}
        return {n for n, p in backbone_weights(self.backbone).items()
                if n in tuned or self._built.get(id(p)) != p._version}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model to `folder` (missing, empty, or a checkpoint, replaced in one step): the heads, the
        backbone weights that changed, LoRA adapters with their settings, and the configuration."""
        return checkpoint.write(self, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, backbone: SentenceTransformer | None = None,
             device: str | torch.device = "cpu") -> MultiTaskModel:
        """A model saved with `save`, on its backbone loaded by name (or on `backbone`), in eval mode."""
        config, tensors = checkpoint.read(folder)
        if backbone is None:
            backbone = bb.load_backbone(config["backbone"], device=device)
        head = config["head"]
        model = cls(backbone, config["tasks"], head=head["kind"], hidden=head["hidden"], dropout=head["dropout"],
                    seed=head["seed"], backbone_name=config["backbone"]).to(device)
        return checkpoint.apply(model, config, tensors).eval()

    def load_weights(self, folder: str | os.PathLike) -> MultiTaskModel:
        """Load a checkpoint saved from a model like this one (same backbone, tasks and heads); refuse anything
        else. A LoRA checkpoint adds its adapters, with its own settings, to a model that has none."""
        return checkpoint.apply(self, *checkpoint.read(folder))

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, tasks={self.label_names}"


def probability_table(texts: Sequence[str], probabilities: Mapping[str, torch.Tensor | np.ndarray],
                      label_names: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """`predict`'s table: the text, then per task its label and confidence, then every label's probability."""
    probabilities = {t: torch.as_tensor(p).cpu() for t, p in probabilities.items()}
    table = pd.DataFrame({"text": list(texts)})
    for task, probs in probabilities.items():
        names = label_names[task]
        table[task] = [names[i] for i in probs.argmax(-1).tolist()]
        table[f"{task} confidence"] = probs.max(-1).values.numpy()
    for task, probs in probabilities.items():
        for j, name in enumerate(label_names[task]):
            table[f"P({task}={name})"] = probs[:, j].numpy()
    return table
