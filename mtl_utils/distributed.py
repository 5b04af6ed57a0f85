"""Training in several processes at once (`accelerate launch`, `torchrun`): what `train` needs to know about them.

`train` calls a few hooks (`share`, `wrap`, `backward`, `mean`, `agree`, ...). In one process they do nothing
(`training.OneProcess`); here they hand the work to Accelerate. Every process draws the same plan of global
batches and trains on its own slice of each (`share`); DDP averages the gradients, so N processes take the steps
one process takes with the same global batch. The command line is the only caller.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from torch import nn

from .model import MultiTaskModel
from .recipes import TrainConfig


def make_accelerator(mixed_precision: str | None = None, cpu: bool = False) -> Accelerator:
    """An Accelerator for `train`: DDP is told that each step uses one head, so the others get no gradient."""
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class Processes:
    """`train`'s hooks for one process among several, through an Accelerator (one process works too)."""

    def __init__(self, accelerator: Accelerator) -> None:
        if accelerator.num_processes > 1 and not getattr(accelerator.ddp_handler, "find_unused_parameters", False):
            raise ValueError("several processes need DDP's find_unused_parameters (each step uses one task's head): "
                             "create the accelerator with mtl_utils.distributed.make_accelerator()")
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.count, self.rank = accelerator.num_processes, accelerator.process_index

    def check(self, config: TrainConfig) -> None:
        """The loop autocasts each step as the config says; the accelerator may only agree (fp16 needs its scaler)."""
        precision = self.accelerator.mixed_precision
        if precision not in ("no", config.mixed_precision):
            raise ValueError(f"the accelerator trains in mixed precision {precision!r} but the config asks for "
                             f"{config.mixed_precision!r}: make both say the same")
        if config.mixed_precision == "fp16" and precision != "fp16":
            raise ValueError("mixed_precision='fp16' needs a GPU and the accelerator's gradient scaler: pass "
                             "Processes(make_accelerator('fp16')), or use 'bf16'")
        if config.batch_size % self.count:
            raise ValueError(f"batch_size {config.batch_size} does not split evenly over {self.count} processes: "
                             f"use a multiple of {self.count}")

    def first(self) -> contextlib.AbstractContextManager:
        """The first process runs the block first (it writes the caches), then the others (they read them)."""
        return self.accelerator.main_process_first()

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        size = len(idx) // self.count
        return idx[self.rank * size:(self.rank + 1) * size]

    def wrap(self, model: MultiTaskModel, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model as DDP sees it (gradients averaged over processes) and the optimizer Accelerate steps."""
        optimizer = self.accelerator.prepare_optimizer(optimizer)
        wrapped = self.accelerator.prepare_model(model, device_placement=False)
        model.count_as_built()  # DDP copied the first process's weights into every process: same values, new versions
        return wrapped, optimizer

    def seed(self, seed: int) -> None:
        """Dropout masks: each process its own, as its own examples."""
        torch.manual_seed(seed + self.rank)

    def mean(self, loss: torch.Tensor) -> float:
        """The whole global batch's loss, the same in every process."""
        return self.accelerator.reduce(loss, "mean").item()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(parameters, max_norm)

    def agree(self, score: float) -> float:
        """Every process keeps the first one's best epoch."""
        return broadcast_object_list([score])[0]

    def unwrap(self, model: nn.Module) -> None:
        """Drop DDP and any mixed-precision wrapper on the model's forward."""
        self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

