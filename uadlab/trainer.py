"""One training loop for the heads that learn by gradient descent: epochs of shuffled mini-batches, progress,
selection and early stopping on the loss of held-out NORMAL images, and a fixed budget for a refit.

A method supplies what only it knows (the loss of a batch, the held-out loss, its optimiser); the loop owns
the rest, so every trained head stops, selects and reports the same way::

    record = train(self, opt, lambda idx, g: self._loss(x[idx], g), n=len(x), cfg=cfg, val_loss=held_out)

Selection never looks at test labels: the held-out images are normal training images the fit did not use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from . import distributed
from .progress import Progress, ProgressFn

SELECT = ("val_loss", "last")


@dataclass
class TrainConfig:
    """How long and how to train (apart from the architecture, which is the method's).

    Attributes:
        epochs: the most epochs to train (the cap when ``patience`` stops earlier).
        batch_size: images per step.
        max_steps: if set, lowers the epochs (never below 1) so a fit costs at most about this many steps.
        patience: stop after this many epochs without a lower held-out loss (None: train every epoch).
        min_delta: a held-out loss counts as lower only below ``best * (1 - min_delta)``.
        select: "val_loss" keeps the weights of the epoch with the lowest held-out loss; "last" the last ones.
        grad_clip: total-norm gradient clipping (None: none).
        seed: seeds the batch order and the method's own random draws (the generator handed to the loss).
    """

    epochs: int
    batch_size: int
    max_steps: int | None = None
    patience: int | None = None
    min_delta: float = 0.0
    select: str = "val_loss"
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {self.select!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 epoch (or None), got {self.patience}")

    def planned_epochs(self, n: int) -> int:
        """Epochs for ``n`` images: ``epochs``, lowered by ``max_steps``."""
        per_epoch = math.ceil(n / self.batch_size)
        return self.epochs if self.max_steps is None else max(1, min(self.epochs, self.max_steps // per_epoch))


@dataclass
class TrainRecord:
    """What a fit did; goes into the head's fit record (model card, ``uadlab_info.json``).

    Attributes:
        epochs: epochs trained; steps: optimiser steps taken.
        val_loss: held-out loss after each epoch ([] without held-out images).
        best_epoch: the epoch whose weights the head keeps (1-based).
        selection: "val_loss" (lowest held-out loss), "last" (last epoch) or "budget" (a refit that trained the
            epoch count another fit selected).
        stopped_early: True when ``patience`` ended training before the cap.
    """

    epochs: int
    steps: int
    best_epoch: int
    selection: str
    val_loss: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(module: nn.Module, opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
          n: int, cfg: TrainConfig, *, val_loss: Callable[[], float] | None = None, budget: int | None = None,
          scheduler: Any = None, progress: ProgressFn | None = None) -> TrainRecord:
    """Train ``module`` on ``n`` images in shuffled batches of image indices.

    Args:
        module: what is trained; its state is what selection keeps.
        opt: the optimiser over (some of) its parameters.
        batch_loss: (indices (b,), generator) -> scalar loss of those images. Under torchrun it computes the
            loss of this rank's ``distributed.local_part`` of the batch; the loop averages the gradients.
        cfg: the training settings.
        val_loss: the loss on held-out normal images (called in eval mode without gradients), or None.
        budget: train exactly this many epochs, without selection or early stopping (a refit on all normal
            images that trains the epoch count a first fit selected on held-out images).
        scheduler: stepped after every optimiser step, if given.
        progress: called after every step.
    Returns:
        The record; the module holds the selected weights, in eval mode.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(n / cfg.batch_size)
    epochs = budget if budget is not None else cfg.planned_epochs(n)
    selecting = budget is None and val_loss is not None
    params = [p for group in opt.param_groups for p in group["params"]]
    total, step, history = epochs * per_epoch, 0, []
    best, best_state, best_epoch, stale, epoch = math.inf, None, epochs, 0, 0
    for epoch in range(1, epochs + 1):
        module.train()
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            loss = batch_loss(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params, len(idx))
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if progress is not None:
                progress(Progress(step, total, "steps", loss=loss.detach().item()))
        if not selecting:
            continue
        module.eval()
        with torch.no_grad():
            v = float(val_loss())
        history.append(v)
        if v < best * (1 - cfg.min_delta) if math.isfinite(best) else v < best:
            best, best_epoch, stale = v, epoch, 0
            if cfg.select == "val_loss":
                best_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
        else:
            stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                break
    stopped = selecting and epoch < epochs
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    selection = "budget" if budget is not None else "val_loss" if best_state is not None else "last"
    return TrainRecord(epochs=epoch, steps=step, best_epoch=best_epoch if best_state is not None else epoch,
                       selection=selection, val_loss=history, stopped_early=stopped)
