"""Annotations and reviews of a workspace: the images to annotate, saving label/mask/note/verdicts, the
counts and summaries the screens show, and the MVTec-layout export. Persistence is the store's
(``store``: one SQLite file, committed at once)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..data import DataError, Sample
from ..safety import export_path
from .sources import dataset_key
from .store import Annotation

if TYPE_CHECKING:
    from pathlib import Path

    from . import Workspace


class Annotations:
    """One user's annotations of the current data and verdicts on runs' heatmaps."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws, self.store, self.user = ws, ws.store, ws.user

    def images(self) -> tuple[list[Sample], str]:
        """The images to annotate (the current data's test split, else its train split) and the dataset key."""
        choice = self.ws.data.choice()
        ds = self.ws.data.dataset(choice)
        return (ds.test or ds.train), dataset_key(choice)

    def at(self, idx: int) -> tuple[Sample, Annotation | None, str, int]:
        """(sample, stored annotation or None, dataset key, number of images) at position ``idx``."""
        samples, key = self.images()
        if not samples:
            raise DataError("the current data has no images to annotate")
        s = samples[int(min(max(int(idx or 0), 0), len(samples) - 1))]
        return s, self.store.get(self.user, key, s.name), key, len(samples)

    def save(self, idx: int, label: str | None, painted: np.ndarray | None, note: str = "",
             run_id: str | None = None, agree: Sequence[str] = (), disagree: Sequence[str] = (),
             clear_mask: bool = False) -> Annotation:
        """Save label, mask, note and verdicts of the image at ``idx`` (committed at once); return the annotation.

        Args:
            painted: newly painted pixels; they are added to the saved mask (None: the mask stays as it is).
            clear_mask: drop the saved mask first.
        """
        s, old, key, _ = self.at(idx)
        both = set(agree) & set(disagree)
        if both:
            raise ValueError(f"agree and disagree both ticked for {', '.join(sorted(both))}: pick one")
        base = None if (clear_mask or old is None) else old.mask
        if painted is not None and base is not None and base.shape == painted.shape:
            painted = np.maximum(base, painted)
        mask_kw = {"mask": painted if painted is not None else base} if (painted is not None or clear_mask) else {}
        ann = self.store.save(self.user, key, s.name, label=label or None, note=note or "", image_path=s.path,
                              image=s.image if s.path is None else None, **mask_kw)
        if run_id:
            for m in self.ws.runs.get(run_id).heads:
                verdict = "agree" if m in agree else "disagree" if m in disagree else None
                self.store.set_review(self.user, key, s.name, run_id, m, verdict)
        self.ws.set_pref("annotate_index", int(idx))
        return ann

    def counts(self, key: str) -> dict[str, int]:
        return self.store.counts(self.user, key)

    def verdicts(self, key: str, name: str, run_id: str) -> dict[str, str]:
        return self.store.reviews(self.user, key, name, run_id)

    def review_summary(self, run_id: str) -> dict[str, dict[str, int]]:
        return self.store.review_summary(self.user, run_id)

    def samples(self, key: str, require_masks: bool = False, images: Sequence[Sample] | None = None) -> list[Sample]:
        """The labelled annotations of a dataset as samples (for metrics, or a zero-shot auxiliary set).

        Args:
            images: the dataset's samples (scans are read through them); default: the current data's, when
                ``key`` is the current data.
        """
        if images is None:
            choice = self.ws.data.choice()
            images = self._all(self.ws.data.dataset(choice)) if choice and dataset_key(choice) == key else []
        return self.store.to_samples(self.user, key, require_masks=require_masks,
                                     samples={s.name: s for s in images})

    @staticmethod
    def _all(ds) -> list[Sample]:
        return list(ds.train) + list(ds.test)

    def export(self) -> "Path":
        """The current dataset's annotations (with its normal training images) as an MVTec-layout zip.

        Written to a private temp folder (never the workspace, which is not served); the app hands it to gradio,
        which serves a copy to this session only, and the sweep removes it after an hour.
        """
        choice = self.ws.data.choice()
        ds = self.ws.data.dataset(choice)
        key = dataset_key(choice)
        if not self.store.list(self.user, key):
            raise ValueError("nothing annotated in this dataset yet: save an annotation first")
        cat = str(choice.get("category") or "annotated")
        cat = "annotated" if cat == "all" else cat
        out = export_path(f"annotations-{cat}-{time.strftime('%Y%m%d-%H%M%S')}.zip")
        return self.store.export_mvtec_zip(self.user, key, out, category=cat, train=ds.train,
                                           samples={s.name: s for s in self._all(ds)})
