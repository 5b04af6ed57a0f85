"""A task's own top layers on a shared frozen backbone: that task adapts, every other task stays exactly as it was.

The bottom layers run once per sentence for every task; above `split`, a task with its own model runs that model's
top layers and head, every other task the shared model's. The other tasks therefore read exactly the backbone they
were validated on: their answers cannot change, whatever the adapted task learns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from . import backbone as bb
from . import freezing
from .data import check_texts
from .model import MultiTaskModel, eval_mode, map_batches


def own_top_layers(model: MultiTaskModel, task: str, k: int) -> MultiTaskModel:
    """Make `model` (a copy of the shared model) the one that trains `task`'s own top `k` layers and head; the
    layers below and every other head are frozen. Train it on `task` alone, then serve it with `Branched`."""
    model.head(task)  # an unknown task is a clear error
    freezing.unfreeze_last(freezing.freeze_all(model), k)
    for name in model.tasks:
        model.head(name).requires_grad_(name == task)
    return model.train(model.training)


class Branched:
    """Several tasks served from one pass through the shared bottom `split` layers; above them each task runs the
    top layers and head of its own model (`own`: task -> model), or of the shared model."""

    def __init__(self, shared: MultiTaskModel, own: Mapping[str, MultiTaskModel], split: int) -> None:
        layers = bb.layers(shared.backbone)
        if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < len(layers):
            raise ValueError(f"split must be an integer from 0 to {len(layers) - 1} (the shared bottom layers), "
                             f"got {split!r}")
        for task, model in own.items():
            shared.head(task)
            if model.backbone_name != shared.backbone_name:
                raise ValueError(f"task {task!r}'s own model is on {model.backbone_name}, the shared one on "
                                 f"{shared.backbone_name}: they share no layers")
            bottom = [bb.embeddings(model.backbone), *bb.layers(model.backbone)[:split]]
            same = [bb.embeddings(shared.backbone), *layers[:split]]
            if not all(torch.equal(a, b) for m, s in zip(bottom, same)
                       for a, b in zip(m.state_dict().values(), s.state_dict().values())):
                raise ValueError(f"task {task!r}'s own model changed layers below {split}: they cannot be shared; "
                                 f"train only its top layers (own_top_layers) or lower split")
        self.shared, self.own, self.split = shared, dict(own), split

    def predict(self, texts: Sequence[str], batch_size: int = 64, tasks: Sequence[str] | None = None
                ) -> dict[str, np.ndarray]:
        """Each task's predicted label names for `texts` (every task of the shared model, or `tasks`)."""
        texts = check_texts(texts)
        tasks = list(self.shared.tasks if tasks is None else tasks)
        models = {task: self.own.get(task, self.shared) for task in tasks}
        st = self.shared.backbone

        def answer(idx: np.ndarray) -> list[torch.Tensor]:
            features = self.shared.features([texts[i] for i in idx])
            mask = features["attention_mask"]
            hidden = bb.run_layers(st, bb.embed_tokens(st, features), mask, 0, self.split)
            out = []
            for task, model in models.items():
                top = bb.run_layers(model.backbone, hidden, mask, self.split)
                out.append(model.head(task)(bb.pool(model.backbone, top, mask)).argmax(-1))
            return out

        with contextlib.ExitStack() as stack:
            for model in {id(m): m for m in [self.shared, *models.values()]}.values():
                stack.enter_context(eval_mode(model))
            found = map_batches(answer, [len(t) for t in texts], batch_size)
        return {task: np.array(models[task].label_names[task])[ids.cpu().numpy()] for task, ids in zip(tasks, found)}
