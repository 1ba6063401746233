"""One training loop for the heads that learn by gradient descent: epochs of shuffled mini-batches, progress,
selection and early stopping on the loss of held-out NORMAL images, and a fixed budget for a refit.

A method supplies what only it knows (the loss of a batch, the held-out loss, its optimiser); the loop owns
the rest, so every trained head stops, selects and reports the same way::

    record = train(self, opt, lambda idx, g: self._loss(x[idx], g), n=len(x), cfg=cfg, val_loss=held_out)

Selection never looks at test labels: the held-out images are normal training images the fit did not use.
With a ``checkpoint`` path the loop saves its whole state after every epoch (safetensors, atomically) and
resumes from it when the same training (``fingerprint``: data and settings) is started again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import distributed
from .fsio import replacing
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


def fingerprint(maps: list[torch.Tensor], config: dict[str, Any]) -> str:
    """A short hash of the training features and the settings: a checkpoint resumes only the same training."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for m in maps:  # a strided sample of the values is enough to tell data sets apart
        h.update(str(tuple(m.shape)).encode())
        h.update(m.flatten()[::97].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Loop:
    """The loop's own state between epochs (what a checkpoint holds besides the tensors)."""

    epoch: int = 0
    step: int = 0
    best: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    history: list[float] = field(default_factory=list)


def _save(path: Path, key: str, module: nn.Module, opt: torch.optim.Optimizer, scheduler: Any, g: torch.Generator,
          loop: _Loop, best_state: dict[str, torch.Tensor] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = {f"model.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    t.update({f"best.{k}": v.contiguous() for k, v in (best_state or {}).items()})
    for i, st in opt.state_dict()["state"].items():
        t.update({f"opt.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone().contiguous()
                  for k, v in st.items()})
    t["rng"] = g.get_state()
    meta = {"key": key, "loop": json.dumps(asdict(loop)),
            "param_groups": json.dumps(opt.state_dict()["param_groups"], default=str),  # lr as scheduled now
            "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None, default=str)}
    with replacing(path) as tmp:  # a temp name per writer: two trainings never share one
        save_file(t, str(tmp), metadata=meta)


def _resume(path: Path, key: str, module: nn.Module, opt: torch.optim.Optimizer, scheduler: Any,
            g: torch.Generator) -> tuple[_Loop, dict[str, torch.Tensor] | None] | None:
    """The state of a checkpoint of the same training, loaded into the objects; None when there is none."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None  # another training: start afresh (the file is overwritten at the first epoch)
        t = load_file(str(path))
    except Exception:  # a damaged file (the process died while the OS wrote it): start afresh
        return None
    module.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")} or None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched = json.loads(meta.get("scheduler", "null"))
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    g.set_state(t["rng"])
    return _Loop(**json.loads(meta["loop"])), best


def train(module: nn.Module, opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
          n: int, cfg: TrainConfig, *, val_loss: Callable[[], float] | None = None, budget: int | None = None,
          scheduler: Any = None, progress: ProgressFn | None = None, checkpoint: str | os.PathLike | None = None,
          key: str = "", checkpoint_every_s: float = 60.0) -> TrainRecord:
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
        checkpoint: file for the loop's state after every epoch; resumed from when its ``key`` matches
            (``fingerprint`` of the data and settings), deleted when training ends.
        key: what identifies this training (see ``checkpoint``).
        checkpoint_every_s: at most one checkpoint per this many seconds (at an epoch's end): short epochs
            must not spend their time writing files.
    Returns:
        The record; the module holds the selected weights, in eval mode.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(n / cfg.batch_size)
    epochs = budget if budget is not None else cfg.planned_epochs(n)
    selecting = budget is None and val_loss is not None
    params = [p for group in opt.param_groups for p in group["params"]]
    total = epochs * per_epoch
    path = Path(checkpoint) if checkpoint is not None else None
    key = f"{key}:{budget}:{int(selecting)}"  # a refit's budget is part of what is trained
    resumed = _resume(path, key, module, opt, scheduler, g) if path is not None else None
    loop, best_state = resumed if resumed is not None else (_Loop(), None)
    finished, saved_at = False, time.monotonic()
    while loop.epoch < epochs and not finished:
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
            loop.step += 1
            if progress is not None:
                progress(Progress(loop.step, total, "steps", loss=loss.detach().item()))
        loop.epoch += 1
        if selecting:
            module.eval()
            with torch.no_grad():
                v = float(val_loss())
            loop.history.append(v)
            if v < loop.best * (1 - cfg.min_delta) if math.isfinite(loop.best) else v < loop.best:
                loop.best, loop.best_epoch, loop.stale = v, loop.epoch, 0
                if cfg.select == "val_loss":
                    best_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
            else:
                loop.stale += 1
                finished = cfg.patience is not None and loop.stale >= cfg.patience
        if path is not None and loop.epoch < epochs and not finished \
                and time.monotonic() - saved_at >= checkpoint_every_s:
            _save(path, key, module, opt, scheduler, g, loop, best_state)
            saved_at = time.monotonic()
    if path is not None:  # done: the weights live in the head now
        path.unlink(missing_ok=True)
    epoch, step, history = loop.epoch, loop.step, loop.history
    best_epoch = loop.best_epoch or epochs
    stopped = selecting and epoch < epochs
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    selection = "budget" if budget is not None else "val_loss" if best_state is not None else "last"
    return TrainRecord(epochs=epoch, steps=step, best_epoch=best_epoch if best_state is not None else epoch,
                       selection=selection, val_loss=history, stopped_early=stopped)
