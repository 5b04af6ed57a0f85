"""MultiTaskModel: one shared sentence-transformer backbone and one classification head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sentence_transformers import SentenceTransformer
from torch import nn
from tqdm.auto import tqdm

from . import freezing

HEAD_KINDS = ("linear", "mlp")


def make_head(dim: int, num_labels: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """A classification head: a linear layer, or a small MLP (linear, GELU, dropout, linear)."""
    if kind == "linear":
        return nn.Linear(dim, num_labels)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))
    raise ValueError(f"unknown head kind {kind!r}; known kinds are {', '.join(HEAD_KINDS)}")


def check_texts(texts: Sequence[str]) -> list[str]:
    """Return the texts as a list; raise if any is not a non-empty string."""
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string; wrap it in a list")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"texts must be non-empty strings; positions {bad[:10]} are empty or not strings")
    return texts


def length_order(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices from the longest to the shortest sequence (stable), so each batch carries little padding."""
    return np.argsort(-np.asarray(lengths), kind="stable")


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
        self.label_names = {task: tuple(labels) for task, labels in tasks.items()}
        for task, labels in self.label_names.items():
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"task {task!r} needs at least two distinct label names, got {labels}")
        self.head_config = {"kind": head, "hidden": hidden, "dropout": dropout, "seed": seed}
        self.embedding_dim = backbone.get_embedding_dimension()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # heads start the same whatever ran before
            self.heads = nn.ModuleDict({
                task: make_head(self.embedding_dim, len(labels), head, hidden, dropout)
                for task, labels in self.label_names.items()
            })
        # names of backbone parameters that have been trained: a checkpoint saves exactly these
        self.tuned_backbone: set[str] = set()

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

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Set training mode, but frozen parts always stay in eval mode (dropout off)."""
        super().train(mode)
        for module in freezing.frozen_modules(self):
            module.eval()
        return self

    def features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise texts (padded to the longest) on the model's device."""
        features = self.backbone.preprocess(check_texts(texts))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    def sentence_embeddings(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the backbone (tokens -> token embeddings -> pooling [-> normalise])."""
        return self.backbone(dict(features))["sentence_embedding"]

    def forward(self, task: str, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One task's logits, from tokenised features or from ready sentence embeddings."""
        head = self.head(task)
        embeddings = inputs if isinstance(inputs, torch.Tensor) else self.sentence_embeddings(inputs)
        return head(embeddings)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Shared sentence embeddings of `texts` (eval mode, batches sorted by length), in input order."""
        texts = check_texts(texts)
        was_training = self.training
        self.eval()
        try:
            lengths = [len(t) for t in texts]
            order = length_order(lengths)
            out = torch.empty(len(texts), self.embedding_dim, device=self.device)
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="embed", disable=not progress, leave=False):
                idx = order[start:start + batch_size]
                out[torch.as_tensor(idx)] = self.sentence_embeddings(self.features([texts[i] for i in idx]))
        finally:
            self.train(was_training)
        return out

    @torch.no_grad()
    def predict_embeddings(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's class probabilities from sentence embeddings (heads in eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return {task: torch.softmax(head(embeddings), dim=-1) for task, head in self.heads.items()}
        finally:
            self.train(was_training)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> pd.DataFrame:
        """Run the backbone once and answer every task: a label and per-label probabilities per text."""
        texts = check_texts(texts)
        probabilities = self.predict_embeddings(self.embed(texts, batch_size))
        table = pd.DataFrame({"text": texts})
        for task, probs in probabilities.items():
            names = self.label_names[task]
            table[task] = [names[i] for i in probs.argmax(-1).tolist()]
            table[f"{task} confidence"] = probs.max(-1).values.cpu().numpy()
        for task, probs in probabilities.items():
            for j, name in enumerate(self.label_names[task]):
                table[f"P({task}={name})"] = probs[:, j].cpu().numpy()
        return table

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, tasks={self.label_names}"
