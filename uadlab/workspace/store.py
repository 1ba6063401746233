"""Annotations and reviews in one SQLite file: saved at once, isolated per user, exportable.

One database file lives in the workspace (WAL mode; every write is its own committed transaction, so
a crash loses nothing that the user saw as saved; saves are upserts, so concurrent requests, threads or
processes never collide and never lose each other's fields). Rows are keyed by ``(user, dataset, sample)``:

- ``annotations``: a label (normal / anomalous / unsure), the painted defect mask as a PNG blob, a note
  and timestamps; the image's path (or, for in-memory images, a PNG blob) so that an export works later;
- ``reviews``: per (sample, run, method) the user's verdict on the method's heatmap: agree / disagree.

Annotations become labelled ``Sample`` objects (test labels for metrics, SPG's auxiliary labelled set)
and an MVTec-layout zip. No token or secret is ever written here.
"""
from __future__ import annotations

import io
import re
import sqlite3
import time
import zipfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..data import Sample
from ..medical import medical_kind

LABELS = ("normal", "anomalous", "unsure")
MAX_NOTE_CHARS = 10_000  # a note is a remark on one image, not a file: the database is shared by every user
VERDICTS = ("agree", "disagree")
_KEEP = object()  # "leave this field unchanged" in partial updates

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    user TEXT NOT NULL,
    dataset TEXT NOT NULL,
    sample TEXT NOT NULL,
    label TEXT CHECK (label IS NULL OR label IN ('normal', 'anomalous', 'unsure')),
    mask_png BLOB,
    note TEXT NOT NULL DEFAULT '',
    image_path TEXT,
    image_png BLOB,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (user, dataset, sample)
);
CREATE TABLE IF NOT EXISTS reviews (
    user TEXT NOT NULL,
    dataset TEXT NOT NULL,
    sample TEXT NOT NULL,
    run_id TEXT NOT NULL,
    method TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    updated REAL NOT NULL,
    PRIMARY KEY (user, dataset, sample, run_id, method)
);
"""


@dataclass
class Annotation:
    """One annotated image of one user."""

    user: str
    dataset: str
    sample: str
    label: str | None
    mask: np.ndarray | None  # (H, W) uint8 0/1, or None when nothing was painted
    note: str
    image_path: str | None
    image_png: bytes | None
    created: float
    updated: float

    @property
    def mask_pixels(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    def load_image(self) -> Image.Image:
        """The annotated image as RGB from its file or stored PNG (a slice of a scan comes from its dataset's
        sample instead: see ``AnnotationStore.export_mvtec_zip``)."""
        if self.image_path and medical_kind(self.image_path):
            raise FileNotFoundError(f"{self.sample}: a slice of a DICOM/NIfTI scan is read through its dataset, "
                                    "which is not loaded")
        if self.image_path and Path(self.image_path).exists():
            return Image.open(self.image_path).convert("RGB")
        if self.image_png is not None:
            return Image.open(io.BytesIO(self.image_png)).convert("RGB")
        raise FileNotFoundError(f"{self.sample}: the annotated image is no longer available")


def mask_to_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    return (np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127).astype(np.uint8)


class AnnotationStore:
    """Annotations and reviews of all users in one SQLite file.

    Args:
        path: the database file (created with its folder if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _connect(self) -> "_Tx":
        return _Tx(self.path)

    # ---- annotations ------------------------------------------------------------------------------
    def save(self, user: str, dataset: str, sample: str, *, label: Any = _KEEP, mask: Any = _KEEP,
             note: Any = _KEEP, image_path: Any = _KEEP, image: Image.Image | None = None) -> Annotation:
        """Create or update one annotation; fields not given keep their stored value. Committed at once.

        Args:
            label: "normal", "anomalous", "unsure" or None (no label yet).
            mask: (H, W) array (nonzero = defect) or None to clear the mask.
            note: free text, at most ``MAX_NOTE_CHARS`` characters (ValueError past it, nothing saved).
            image_path: where the image lives (for exports).
            image: the image itself, stored as PNG only when it has no path (in-memory datasets).
        """
        if label is not _KEEP and label is not None and label not in LABELS:
            raise ValueError(f"label must be one of {LABELS} or None, got {label!r}")
        if note is not _KEEP and note is not None and len(str(note)) > MAX_NOTE_CHARS:
            raise ValueError(f"the note has {len(str(note)):,} characters; the limit is {MAX_NOTE_CHARS:,}: "
                             "shorten it (nothing was saved)")
        now = time.time()
        mask_png = _KEEP if mask is _KEEP else (None if mask is None or not np.any(mask) else mask_to_png(mask))
        image_png = _KEEP
        if image is not None and image_path in (_KEEP, None):
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            image_png = buf.getvalue()
        fields = {"label": label, "mask_png": mask_png, "note": "" if note is None else note,
                  "image_path": image_path, "image_png": image_png}
        given = {k: v for k, v in fields.items() if v is not _KEEP}
        cols = ["user", "dataset", "sample", *given, "created", "updated"]
        sets = ", ".join(f"{k}=excluded.{k}" for k in [*given, "updated"])
        with self._connect() as con:  # one upsert: concurrent first saves of a sample never collide
            con.execute(f"INSERT INTO annotations ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                        f"ON CONFLICT (user, dataset, sample) DO UPDATE SET {sets}",
                        (user, dataset, sample, *given.values(), now, now))
            row = con.execute("SELECT * FROM annotations WHERE user=? AND dataset=? AND sample=?",
                              (user, dataset, sample)).fetchone()
        return _annotation(row)

    def get(self, user: str, dataset: str, sample: str) -> Annotation | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM annotations WHERE user=? AND dataset=? AND sample=?",
                              (user, dataset, sample)).fetchone()
        return None if row is None else _annotation(row)

    def list(self, user: str, dataset: str | None = None) -> list[Annotation]:
        """All annotations of ``user`` (in one dataset when given), oldest first."""
        q, args = "SELECT * FROM annotations WHERE user=?", [user]
        if dataset is not None:
            q, args = q + " AND dataset=?", args + [dataset]
        with self._connect() as con:
            rows = con.execute(q + " ORDER BY created", args).fetchall()
        return [_annotation(r) for r in rows]

    def delete(self, user: str, dataset: str, sample: str) -> None:
        with self._connect() as con:
            con.execute("DELETE FROM annotations WHERE user=? AND dataset=? AND sample=?", (user, dataset, sample))
            con.execute("DELETE FROM reviews WHERE user=? AND dataset=? AND sample=?", (user, dataset, sample))

    def delete_user(self, user: str) -> int:
        """Delete every annotation and review of ``user`` (an expired workspace); return how many annotations."""
        with self._connect() as con:
            n = con.execute("DELETE FROM annotations WHERE user=?", (user,)).rowcount
            con.execute("DELETE FROM reviews WHERE user=?", (user,))
        return n

    def counts(self, user: str, dataset: str) -> dict[str, int]:
        """Number of annotations per label (key "none" for annotations without a label yet)."""
        with self._connect() as con:
            rows = con.execute("SELECT label, COUNT(*) FROM annotations WHERE user=? AND dataset=? GROUP BY label",
                               (user, dataset)).fetchall()
        return {(r[0] or "none"): r[1] for r in rows}

    # ---- reviews ----------------------------------------------------------------------------------
    def set_review(self, user: str, dataset: str, sample: str, run_id: str, method: str,
                   verdict: str | None) -> None:
        """Record agree / disagree with a method's map on one image; None removes the verdict."""
        with self._connect() as con:
            if verdict is None:
                con.execute("DELETE FROM reviews WHERE user=? AND dataset=? AND sample=? AND run_id=? AND method=?",
                            (user, dataset, sample, run_id, method))
                return
            if verdict not in VERDICTS:
                raise ValueError(f"verdict must be one of {VERDICTS} or None, got {verdict!r}")
            con.execute("INSERT INTO reviews VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, dataset, sample, run_id, "
                        "method) DO UPDATE SET verdict=excluded.verdict, updated=excluded.updated",
                        (user, dataset, sample, run_id, method, verdict, time.time()))

    def reviews(self, user: str, dataset: str, sample: str, run_id: str) -> dict[str, str]:
        """{method: verdict} of one image under one run."""
        with self._connect() as con:
            rows = con.execute("SELECT method, verdict FROM reviews WHERE user=? AND dataset=? AND sample=? AND "
                               "run_id=?", (user, dataset, sample, run_id)).fetchall()
        return dict(rows)

    def review_summary(self, user: str, run_id: str) -> dict[str, dict[str, int]]:
        """{method: {"agree": n, "disagree": m}} over all reviewed images of a run."""
        with self._connect() as con:
            rows = con.execute("SELECT method, verdict, COUNT(*) FROM reviews WHERE user=? AND run_id=? "
                               "GROUP BY method, verdict", (user, run_id)).fetchall()
        out: dict[str, dict[str, int]] = {}
        for method, verdict, n in rows:
            out.setdefault(method, {"agree": 0, "disagree": 0})[verdict] = n
        return out

    # ---- annotations as data ------------------------------------------------------------------------
    def to_samples(self, user: str, dataset: str, require_masks: bool = False,
                   category: str = "annotations", samples: Mapping[str, Sample] | None = None) -> list[Sample]:
        """Labelled samples from the annotations (unsure and unlabelled ones are left out).

        Args:
            require_masks: drop anomalous images without a painted mask (SPG's auxiliary set needs masks).
            samples: the dataset's samples by name: an annotated sample found there is read as it is (a DICOM
                frame or NIfTI slice through its reader and window), others from the stored path or PNG.
        """
        out = []
        for a in self.list(user, dataset):
            if a.label not in ("normal", "anomalous"):
                continue
            label = int(a.label == "anomalous")
            if label and a.mask is None and require_masks:
                continue
            base = (samples or {}).get(a.sample)
            if base is not None:
                out.append(Sample(a.sample, base.path, base.image, label, mask=a.mask if label else None,
                                  category=category, defect="annotated" if label else "good", source=base.source,
                                  window=base.window, patient=base.patient))
                continue
            if a.image_path and medical_kind(a.image_path):
                continue  # a scan slice without its dataset: nothing to read it with
            image = None
            if not (a.image_path and Path(a.image_path).exists()):
                if a.image_png is None:
                    continue
                image = a.load_image()
            mask = a.mask if label else None
            out.append(Sample(a.sample, path=None if image is not None else a.image_path, image=image, label=label,
                              mask=mask, category=category, defect="annotated" if label else "good"))
        return out

    def export_mvtec_zip(self, user: str, dataset: str, out_path: str | Path, category: str = "annotated",
                         train: Sequence[Sample] = (), samples: Mapping[str, Sample] | None = None) -> Path:
        """Write the annotated images of ``dataset`` as an MVTec-layout zip and return its path.

        Layout: ``<category>/test/good/``, ``<category>/test/anomalous/``,
        ``<category>/ground_truth/anomalous/<name>_mask.png`` and, when ``train`` is given,
        ``<category>/train/good/``. Unsure and unlabelled images are left out. Images are 8-bit PNGs as the
        app shows them: annotated samples found in ``samples`` (by name; DICOM frames and NIfTI slices must
        be) are rendered through their reader and window, others come from the stored file or PNG.

        Raises:
            FileNotFoundError: an annotated slice of a scan is not in ``samples``.
        """
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        cat = _safe_name(category) or "annotated"
        with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for s in train:
                buf = io.BytesIO()
                s.load().save(buf, format="PNG")
                zf.writestr(f"{cat}/train/good/{_safe_name(s.name)}.png", buf.getvalue())
            for a in self.list(user, dataset):
                if a.label not in ("normal", "anomalous"):
                    continue
                base = (samples or {}).get(a.sample)
                try:
                    img = base.load() if base is not None else a.load_image()
                except FileNotFoundError:
                    if a.image_path and medical_kind(a.image_path):
                        raise
                    continue
                stem = _safe_name(a.sample)
                folder = "good" if a.label == "normal" else "anomalous"
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                zf.writestr(f"{cat}/test/{folder}/{stem}.png", buf.getvalue())
                if a.label == "anomalous":
                    mask = a.mask if a.mask is not None else np.zeros((img.height, img.width), np.uint8)
                    if mask.shape != (img.height, img.width):
                        mask = np.asarray(Image.fromarray(mask * 255).resize(img.size, Image.NEAREST)) > 127
                    zf.writestr(f"{cat}/ground_truth/anomalous/{stem}_mask.png", mask_to_png(mask))
        return out_path


class _Tx:
    """A short-lived connection that commits on success and always closes (safe across threads)."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, timeout=30)
        self.con.row_factory = sqlite3.Row

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, exc_type, exc, tb) -> None:
        with closing(self.con):
            if exc_type is None:
                self.con.commit()
            else:
                self.con.rollback()


def _annotation(row: sqlite3.Row) -> Annotation:
    return Annotation(row["user"], row["dataset"], row["sample"], row["label"],
                      None if row["mask_png"] is None else png_to_mask(row["mask_png"]), row["note"] or "",
                      row["image_path"], row["image_png"], row["created"], row["updated"])


def _safe_name(name: str) -> str:
    """A sample name as one flat, safe file stem: ``brick/test/hole/000.png`` -> ``brick_test_hole_000``."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?|webp)$", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")

