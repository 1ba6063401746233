"""An ensemble of the run's other heads, on their shared calibrated scale.

Every head's maps and scores are calibrated on held-out normal images (0 = the median normal value, 1 = the
normal limit), so maps of different methods can be combined without per-method normalisation: the weighted
mean says where the methods agree, the max flags what any one of them finds.

Members and weights are chosen WITHOUT test labels: averaging in a weak member drags an ensemble below its
best member (on one real set the plain mean scored 0.932 image AUROC against PatchCore's 0.956). What the
held-out normal images can tell was measured on the hard synthetic set (tests/harddata.py, 30 normals, quick
preset): neither the members' agreement on held-out normal scores or maps, nor the spread or fold-to-fold
stability of their calibrated normal scores singles out the weak members (Spatial AR 0.76 and VarAD 0.77
image AUROC agree with each other most, 0.6-0.7 rank correlation). So the default membership is a prior
stated here: the run's memory banks (heads fitted in one pass, ``fit_in_one_pass``), the strongest members in
every comparison we have (two real sets, the hard set); other heads join when named in ``members`` or with
``select="all"``. Weights among the chosen members come from their held-out normal scores
(``member_weights``); both are recorded in ``fit_record.details``. Measured on 9 hard sets (brick, grass, gravel x 3
seeds, 30 normals, quick preset): the banks' ensemble is 0.0009 image AUROC below its best member on average,
0.0117 at worst (gravel, seed 1; 3 of 256 pairs); the plain mean of all five heads was 0.012 and 0.035 below
on the two sets where all five were run; the max of the banks 0.010 below on average, 0.043 at worst.
"""
from __future__ import annotations

from typing import Any

import torch

from ..settings import OFFLINE_DEFAULT
from ..features import PatchFeatures
from .base import AnomalyResult, FitContext, Method, register_method

WEIGHTINGS = ("agreement", "equal")
SELECTIONS = ("banks", "all")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last axis (ties broken by position: held-out scores are continuous)."""
    return x.argsort(-1).argsort(-1).double()


def member_weights(normal_scores: torch.Tensor, weighting: str = "agreement") -> torch.Tensor:
    """Weights (M,) of M members from their calibrated scores (M, n) on the same n held-out normal images.

    ``agreement``: a member's weight is the Spearman correlation of its normal scores with the mean rank of
    the OTHER members, clipped at 0. What makes one normal image look less typical than another (a
    scratch-free but unusual texture patch, a different lighting) is seen by every member that models the
    images well; a member whose normal scores no other member shares is ranking noise, and at test time
    that noise is what it adds to the mean. ``equal``: the plain mean. Fewer than 3 images or 2 members,
    or no member agreeing with the others: equal weights.
    """
    m, n = normal_scores.shape
    if weighting == "equal" or m < 2 or n < 3:
        return torch.full((m,), 1.0 / m)
    r = _ranks(normal_scores.double())
    r = r - r.mean(1, keepdim=True)
    w = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        others = torch.cat([r[:i], r[i + 1:]]).mean(0)
        den = float(r[i].norm() * others.norm())
        w[i] = max(0.0, float(r[i] @ others) / den) if den > 0 else 0.0
    if float(w.sum()) <= 0:
        return torch.full((m,), 1.0 / m)
    return (w / w.sum()).float()


@register_method
class Ensemble(Method):
    """The weighted mean (or max) of the calibrated heatmaps and image scores of the run's other heads.

    The combination is calibrated again on the same held-out normal images, so 1.0 keeps its meaning.
    The weights come from the members' cross-fitted held-out normal scores (``member_weights``; no test
    label is ever used) and are recorded in ``fit_record.details["member_weights"]``; a member with weight 0 is left out.
    It has no other learned state: it is fitted, saved, benchmarked and shown like any head, but scores
    through a ``Run`` (which holds its members), not from features.

    Args:
        combine: "mean" (weighted) or "max" over the members (with weight > 0).
        members: the heads to combine (None: chosen by ``select``).
        select: with ``members`` None: "banks" (default: the run's memory banks when there are at least two,
            else every other head) or "all" (every other head).
        weighting: "agreement" (default) or "equal" (the plain mean of the members).
    """

    name = "ensemble"
    paper = ("uadlab: weighted mean or max of methods' calibrated maps (no paper; possible because all maps "
             "share one scale)")
    summary = ("Averages (or takes the maximum of) the calibrated heatmaps and image scores of the run's memory "
               "banks (or of the methods you name), each weighted by how much its scores of held-out normal images "
               "agree with the others'. Comparing it with its members shows which findings only one method makes.")
    combines_heads = True
    presets = {"tiny": {}, "quick": {}, "paper": {}}

    def __init__(self, backbone: str = OFFLINE_DEFAULT, combine: str = "mean",
                 members: list[str] | None = None, select: str = "banks", weighting: str = "agreement") -> None:
        super().__init__(backbone)
        if combine not in ("mean", "max"):
            raise ValueError(f"ensemble: combine must be 'mean' or 'max', got {combine!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"ensemble: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if select not in SELECTIONS:
            raise ValueError(f"ensemble: select must be one of {SELECTIONS}, got {select!r}")
        self.combine_mode = combine
        self.members = list(members) if members else None
        self.select = select
        self.weighting = weighting
        self.register_buffer("weights", torch.zeros(0))  # per member, in members_in order; empty: equal

    def members_in(self, heads: dict[str, Method]) -> list[str]:
        """The member names among the run's ``heads`` (combining heads are never members)."""
        if self.members is not None:
            return list(self.members)
        others = [n for n, h in heads.items() if not h.combines_heads]
        if self.select == "all" or (self.is_fitted and len(self.weights) == 0):  # saved before selection: all
            return others
        banks = [n for n in others if heads[n].fit_in_one_pass and not heads[n].zero_shot]
        return banks if len(banks) >= 2 else others

    def check_members(self, heads: dict[str, Method]) -> None:
        """Raise unless at least two members are among the run's other ``heads``."""
        members = self.members_in(heads)
        missing = [m for m in members if m not in heads or heads[m].combines_heads]
        if missing:
            raise ValueError(f"ensemble: members {missing} are not methods of this run ({', '.join(heads)})")
        if len(members) < 2:
            raise ValueError("ensemble: choose at least two other methods to combine")

    def fit_members(self, heads: dict[str, Method],
                    held_out: dict[str, torch.Tensor] | None = None) -> "Ensemble":
        """Check the members among the run's ``heads`` and weigh them from ``held_out``: each member's
        CALIBRATED scores (n,) of the same n held-out normal images (None: equal weights)."""
        self.check_members(heads)
        names = self.members_in(heads)
        if held_out is not None and all(m in held_out for m in names):
            w = member_weights(torch.stack([held_out[m].float() for m in names]), self.weighting)
        else:
            w = torch.full((len(names),), 1.0 / len(names))
        self.weights = w
        self._fitted.fill_(True)
        self.fit_record.details.update(combine=self.combine_mode, select=self.select, weighting=self.weighting,
                                       member_weights={m: round(float(x), 4) for m, x in zip(names, w)},
                                       members_used=[m for m, x in zip(names, w) if x > 0])
        return self.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # an ensemble saved before it had weights combined every member equally: it still does
        state_dict = {"weights": torch.zeros(0), **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def combine(self, maps: list[torch.Tensor], scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated member maps [(B, H, W)] and scores [(B,)] -> combined (B, H, W), (B,)."""
        m, s = torch.stack(maps), torch.stack(scores)
        w = self.weights if len(self.weights) == len(maps) else torch.full((len(maps),), 1.0 / len(maps))
        if self.combine_mode == "max":
            keep = w > 0
            return m[keep].max(0).values, s[keep].max(0).values
        w = w.to(m.dtype)
        return (w.view(-1, 1, 1, 1) * m).sum(0), (w.view(-1, 1) * s).sum(0)

    def _fit(self, features: PatchFeatures, progress, context: FitContext) -> None:
        raise TypeError("the ensemble is fitted by a Run (it combines the run's other heads)")

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        raise TypeError("the ensemble scores through a Run (it combines the run's other heads' calibrated maps)")
