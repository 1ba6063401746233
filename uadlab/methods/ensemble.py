"""An ensemble of the run's other heads, on their shared calibrated scale.

Every head's maps and scores are calibrated on held-out normal images (0 = the median normal value, 1 = the
chosen normal quantile), so maps of different methods can be combined without per-method normalisation:
the mean says where the methods agree, the max flags what any one of them finds.
"""
from __future__ import annotations

from typing import Any

import torch

from ..settings import OFFLINE_DEFAULT
from ..features import PatchFeatures
from .base import AnomalyResult, Method, register_method


@register_method
class Ensemble(Method):
    """The mean (or max) of the calibrated heatmaps and image scores of the run's other heads.

    The combination is calibrated again on the same held-out normal images, so 1.0 keeps its meaning.
    It has no learned state of its own: it is fitted, saved, benchmarked and shown like any head, but
    scores through a ``Run`` (which holds its members), not from features.

    Args:
        combine: "mean" or "max" over the members.
        members: the heads to combine (None: every other head of the run).
    """

    name = "ensemble"
    paper = "uadlab: mean or max of methods' calibrated maps (no paper; possible because all maps share one scale)"
    summary = ("Averages (or takes the maximum of) the calibrated heatmaps and image scores of the other methods "
               "in the run. Where the methods agree the ensemble is confident; comparing it with its members "
               "shows which findings only one method makes.")
    combines_heads = True
    presets = {"tiny": {}, "quick": {}, "paper": {}}

    def __init__(self, backbone: str = OFFLINE_DEFAULT, combine: str = "mean",
                 members: list[str] | None = None) -> None:
        super().__init__(backbone)
        if combine not in ("mean", "max"):
            raise ValueError(f"ensemble: combine must be 'mean' or 'max', got {combine!r}")
        self.combine_mode = combine
        self.members = list(members) if members else None

    def members_in(self, heads: dict[str, Method]) -> list[str]:
        """The member names among the run's ``heads`` (combining heads are never members)."""
        if self.members is not None:
            return list(self.members)
        return [n for n, h in heads.items() if not h.combines_heads]

    def check_members(self, heads: dict[str, Method]) -> None:
        """Raise unless at least two members are among the run's other ``heads``."""
        members = self.members_in(heads)
        missing = [m for m in members if m not in heads or heads[m].combines_heads]
        if missing:
            raise ValueError(f"ensemble: members {missing} are not methods of this run ({', '.join(heads)})")
        if len(members) < 2:
            raise ValueError("ensemble: choose at least two other methods to combine")

    def fit_members(self, heads: dict[str, Method]) -> "Ensemble":
        """Nothing to learn: check the members among the run's ``heads`` and mark the head fitted."""
        self.check_members(heads)
        self._fitted.fill_(True)
        self.fit_info.update(combine=self.combine_mode)
        return self.eval()

    def combine(self, maps: list[torch.Tensor], scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated member maps [(B, H, W)] and scores [(B,)] -> combined (B, H, W), (B,)."""
        m, s = torch.stack(maps), torch.stack(scores)
        if self.combine_mode == "max":
            return m.max(0).values, s.max(0).values
        return m.mean(0), s.mean(0)

    def _fit(self, features: PatchFeatures, progress=None, **kw: Any) -> None:
        raise TypeError("the ensemble is fitted by a Run (it combines the run's other heads)")

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        raise TypeError("the ensemble scores through a Run (it combines the run's other heads' calibrated maps)")
