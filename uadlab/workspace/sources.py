"""Data sources of a workspace: the demo, uploads (zip or loose files), allowed server folders and Hugging
Face datasets. A source is a JSON-able *choice* (``{"kind": "demo" | "upload" | "folder" | "hf", ...}``);
the current one is kept in ``data.json`` (never a token) and its Dataset in a process-wide LRU."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from PIL import Image

from .. import medical, settings
from ..data import (IMAGE_EXTS, SKIPPED_MEMBERS, DataError, Dataset, Sample, file_stem, is_image_name, load_files,
                    load_hf, load_mvtec, load_unpacked, safe_extract_zip, skipped_warnings)
from ..fsio import write_atomic
from ..progress import ProgressFn
from ..safety import confine, hub_id, limits, resolve_local_folder
from .session import ID_RE, LRU

if TYPE_CHECKING:
    from . import Workspace

_DATASETS = LRU(16)  # (user, data choice json) -> Dataset (lazy samples: cheap)


def demo_kwargs() -> dict[str, Any]:
    """Arguments of ``make_demo`` for the app's demo data (env ``UADLAB_DEMO`` as JSON, e.g. smaller for tests)."""
    raw = settings.demo_settings()
    return json.loads(raw) if raw.strip() else {}


def open_source(choice: dict[str, Any], uploads: Path, token: str | None = None,
                progress: ProgressFn | None = None) -> Dataset:
    """A dataset from a data choice, category applied (``progress``: the rows of a streamed dataset)."""
    kind = choice.get("kind")
    if kind == "demo":
        from ..demo import make_demo

        ds = load_mvtec(make_demo(**demo_kwargs()), skip_bad=True)
        ds.name = "demo"
    elif kind == "folder":
        p = resolve_local_folder(str(choice.get("path") or ""))
        ds = _confined(load_unpacked(p, skip_bad=True), p)
    elif kind == "upload":
        uid = str(choice.get("id", ""))
        if not ID_RE.match(uid) or not (uploads / uid).is_dir():
            raise DataError(f"upload {uid!r} is no longer in this workspace: upload it again")
        ds = _open_upload(uploads / uid)
    elif kind == "hf":
        repo = hub_id(choice.get("repo"), "dataset")
        opt = lambda k: (str(choice.get(k) or "").strip() or None)  # noqa: E731
        cap = limits().upload_images
        spool = hf_spool(uploads, choice) if choice.get("streaming", True) else None
        ds = load_hf(repo, split=opt("split") or "train", test_split=opt("test_split"),
                     image_column=opt("image_column") or "image", label_column=opt("label_column"),
                     mask_column=opt("mask_column"), category_column=opt("category_column"), config=opt("config"),
                     token=token or None, limit=min(int(choice.get("limit") or cap), cap), skip_bad=True,
                     streaming=spool is not None, spool=spool, progress=progress)
        if spool is not None and spool.exists():
            os.utime(spool)  # in use: not pruned (``DataSources._prune_streamed``)
    else:
        raise DataError(f"unknown data source {kind!r}")
    cat = choice.get("category")
    if cat and cat != "all" and len(ds.categories) > 1:
        if cat not in ds.categories:
            raise DataError(f"{ds.name}: no category {cat!r} (have {', '.join(ds.categories)})")
        ds = ds.category(cat)
    return ds


def hf_spool(uploads: Path, choice: dict[str, Any]) -> Path:
    """Where the streamed rows of a Hugging Face choice are written: this user's workspace, one folder per
    dataset choice (whatever its category)."""
    key = json.dumps({k: v for k, v in choice.items() if k != "category"}, sort_keys=True)
    return uploads.parent / "hf" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _confined(ds: Dataset, folder: Path) -> Dataset:
    """``ds`` without the samples whose image or mask is a link to a file outside ``folder``."""
    keep = lambda s: confine([s.path, s.mask_path], folder)  # noqa: E731
    dropped = [s.name for s in ds.train + ds.test if not keep(s)]
    return Dataset(ds.name, [s for s in ds.train if keep(s)], [s for s in ds.test if keep(s)],
                   ds.warnings + [f"skipped {n}: a link to a file outside the folder" for n in dropped])


def _open_upload(root: Path) -> Dataset:
    ds = _read_upload(root)
    skipped = root / SKIPPED_MEMBERS  # files of the upload that were not kept (not images, masks or scans)
    if skipped.exists():
        info = json.loads(skipped.read_text())
        ds.warnings += skipped_warnings(info["names"], info["count"])
    return ds


def _read_upload(root: Path) -> Dataset:
    manifest = root / "manifest.json"
    if manifest.exists():  # loose files: train/, test/, masks/ (images, DICOM files, NIfTI volumes)
        info = json.loads(manifest.read_text())
        warn: list[str] = []
        files = lambda sub: sorted(p for p in (root / sub).glob("*") if p.is_file())  # noqa: E731
        masks = {}
        for p in files("masks"):
            stem = file_stem(p)
            masks[stem[:-5] if stem.endswith("_mask") else stem] = str(p)
        train = load_files(files("train"), label=0, skip_bad=True, warn=warn)
        # DICOM SEG masks pair with the DICOM test files by SOP Instance UID, not by name: read them together
        segs = [p for p in files("masks") if medical.medical_kind(p) == "dicom"]
        paired = lambda p: file_stem(p) in masks or bool(segs and medical.medical_kind(p) == "dicom")  # noqa: E731
        masked = [p for p in files("test") if paired(p)]
        unmasked = [p for p in files("test") if not paired(p)]
        test = (load_files(masked + segs if masked else [], label=1, masks=masks, skip_bad=True, warn=warn)  # no lesion: 0
                + load_files(unmasked, label=0 if info.get("unmasked_test_normal") else -1, skip_bad=True, warn=warn))
        for s in test:
            s.defect = "defect" if s.label == 1 else ("good" if s.label == 0 else "")
        ds = Dataset("upload", train, test, warn)
        if not ds.train and not ds.test:
            raise DataError("the upload holds no usable images" + (f" ({warn[0]})" if warn else ""))
        return ds
    return load_unpacked(root, skip_bad=True, unwrap=True)  # a zip: MVTec layout or plain normal images


def scan_voxels(paths: Iterable[str | os.PathLike]) -> int:
    """The voxels the DICOM and NIfTI files among ``paths`` declare (headers only: nothing is decoded)."""
    return sum(medical.declared_voxels(p) for p in paths if medical.medical_kind(p))


def dataset_key(choice: dict[str, Any]) -> str:
    """A stable name of a data choice, used to key annotations (e.g. ``demo/brick``)."""
    kind = choice.get("kind", "?")
    base = {"demo": "demo", "folder": f"folder:{choice.get('path', '')}", "upload": f"upload:{choice.get('id', '')}",
            "hf": f"hf:{choice.get('repo', '')}"}.get(kind, kind)
    return f"{base}/{choice.get('category') or 'all'}"


def source_label(choice: dict[str, Any]) -> str:
    """What a person calls a data choice: ``demo/brick``, ``bottle.zip/all``, ``owner/name/all``."""
    kind = choice.get("kind")
    base = {"demo": "demo", "folder": Path(str(choice.get("path") or "folder")).name, "hf": str(choice.get("repo")),
            "upload": str(choice.get("label") or "upload")}.get(kind, str(kind))
    return f"{base}/{choice.get('category') or 'all'}"


def _scan_of(s: Sample) -> str | None:
    """The volume or DICOM series a slice belongs to (its file / series name), None for an image."""
    if s.source is None:
        return None
    return s.name.split("#")[0] if "#" in s.name else s.name.rsplit("/", 1)[0]


def default_selection(samples: Sequence[Sample], n: int = 5) -> list[str]:
    """A few test images worth looking at: one normal, then one per defect type (then any). Slices of scans:
    one slice per volume (the viewer browses the rest of it), the middle slice of its finding when it has
    one, else its middle slice; volumes with a finding and without alternate."""
    scans: dict[str, list[Sample]] = {}
    for s in samples:
        key = _scan_of(s)
        if key is not None:
            scans.setdefault(key, []).append(s)
    if scans:
        def pick(slices: list[Sample]) -> str:
            hit = [s for s in slices if s.label == 1]
            return (hit or slices)[len(hit or slices) // 2].name
        sick = [pick(v) for v in scans.values() if any(s.label == 1 for s in v)]
        well = [pick(v) for v in scans.values() if not any(s.label == 1 for s in v)]
        mixed = [x for pair in zip(well, sick) for x in pair] + well[len(sick):] + sick[len(well):]
        return mixed[:n]
    picked: list[str] = []
    seen: set[str] = set()
    for s in samples:
        kind = "good" if s.label == 0 else (s.defect or "anomalous")
        if kind not in seen:
            seen.add(kind)
            picked.append(s.name)
    for s in samples:
        if len(picked) >= n:
            break
        if s.name not in picked:
            picked.append(s.name)
    return picked[:n]


def thumbnail(s: Sample, size: int = 160) -> Image.Image:
    """A small RGB copy of a sample's image for previews."""
    img = s.load().copy()
    img.thumbnail((size, size))
    return img


def describe(s: Sample) -> str:
    if s.label == 0:
        return "normal"
    if s.label == 1:
        return f"anomalous ({s.defect})" if s.defect else "anomalous"
    return "unlabelled"


def _new_upload_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class DataSources:
    """The data of one workspace: the current choice, its dataset, new uploads."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws = ws
        self.uploads = ws.dir / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)

    def choice(self) -> dict[str, Any] | None:
        """The current data choice (None before the first load)."""
        p = self.ws.dir / "data.json"
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (OSError, json.JSONDecodeError):
            return None

    def dataset(self, choice: dict[str, Any] | None = None, token: str | None = None,
                progress: ProgressFn | None = None) -> Dataset:
        """The dataset of ``choice`` (default: the current one), cached per user."""
        choice = choice or self.choice()
        if choice is None:
            raise DataError("no data loaded yet: choose a data source in the Data tab")
        key = (self.ws.user, json.dumps(choice, sort_keys=True))
        return _DATASETS.get(key, lambda: open_source(choice, self.uploads, token, progress))

    def set(self, choice: dict[str, Any], token: str | None = None, new_upload: bool = False,
            progress: ProgressFn | None = None) -> Dataset:
        """Open a data source, make it the current one (saved to disk, without any token) and return it.

        Args:
            new_upload: ``choice`` is an upload just added: when it does not open, its folder is removed at once
                (nothing could choose it again).
        """
        choice = {k: v for k, v in choice.items() if k != "token"}
        _DATASETS.drop(lambda k: k == (self.ws.user, json.dumps(choice, sort_keys=True)))
        if choice.get("kind") == "hf":
            self._prune_streamed(keep=hf_spool(self.uploads, choice))
            self.ws.check_disk()  # streamed rows are written into the workspace
        try:
            ds = self.dataset(choice, token, progress)
            if not ds.train and not ds.test:
                raise DataError(f"{ds.name}: no usable images")
        except Exception:
            if new_upload and choice.get("kind") == "upload" and ID_RE.match(str(choice.get("id", ""))):
                shutil.rmtree(self.uploads / choice["id"], ignore_errors=True)
            raise
        write_atomic(self.ws.dir / "data.json", json.dumps(choice))  # two tabs may write at once
        return ds

    def _prune_streamed(self, keep: Path, idle_s: float = 3600) -> None:
        """Remove the streamed rows of other Hugging Face choices unused for ``idle_s``: they can be streamed
        again, and would otherwise fill the workspace's disk quota."""
        for d in (self.uploads.parent / "hf").glob("*"):
            if d != keep and d.is_dir() and time.time() - d.stat().st_mtime > idle_s:
                shutil.rmtree(d, ignore_errors=True)

    def categories(self, choice: dict[str, Any]) -> list[str]:
        """Every category of the choice's source (the choice itself may be one of them)."""
        return self.dataset({**choice, "category": "all"}).categories

    def auxiliary(self, choice: dict[str, Any], source: str) -> list[Sample]:
        """The auxiliary labelled set of zero-shot methods: other categories' test images, or annotations."""
        if source == "annotations":
            aux = self.ws.annotations.samples(dataset_key(choice), require_masks=True)
            where = "your annotations of this dataset"
        else:
            cat = choice.get("category")
            if not cat or cat == "all":
                raise DataError("the auxiliary set 'other categories' needs one target category: choose a category "
                                "in the Data tab (the others then serve as the labelled set), or use annotations")
            from ..pipeline import auxiliary_set

            aux = auxiliary_set(self.dataset({**choice, "category": "all"}), [cat])
            where = "the other categories' test images"
        if not any(s.label == 1 for s in aux) or not any(s.label == 0 for s in aux):
            raise DataError(f"a zero-shot method needs an auxiliary labelled set with normal and anomalous "
                            f"(masked) images; {where} gave {len(aux)} usable images")
        return aux

    # ---- uploads --------------------------------------------------------------------------------------------
    def add_zip(self, zip_path: str | os.PathLike) -> dict[str, Any]:
        """Unpack an uploaded zip (safely, within the limits) into a new upload folder; return its data choice."""
        try:
            with zipfile.ZipFile(zip_path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{Path(zip_path).name}: not a valid zip file ({e})") from None
        members = [i for i in infos if not i.is_dir() and is_image_name(i.filename)]
        free = self.ws.check_upload(os.path.getsize(zip_path), len(members), sum(i.file_size for i in members))
        uid = _new_upload_id()
        root = self.uploads / uid
        try:
            skipped: list[str] = []  # only images, masks and scans are unpacked: other files would only take disk
            safe_extract_zip(zip_path, root, max_bytes=free, images_only=True, skipped=skipped)
            self.ws.check_upload(0, 0, 0, voxels=scan_voxels(p for p in root.rglob("*") if p.is_file()))
            if skipped:
                (root / SKIPPED_MEMBERS).write_text(json.dumps({"names": skipped[:20], "count": len(skipped)}))
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return {"kind": "upload", "id": uid, "label": Path(zip_path).name}

    def add_files(self, train: Sequence[str], test: Sequence[str] = (), masks: Sequence[str] = (),
                  unmasked_test_normal: bool = False) -> dict[str, Any]:
        """Copy uploaded loose images into a new upload folder; return its data choice.

        Masks pair with test images by file stem (``x.png`` <-> ``x.png`` or ``x_mask.png``); a test image with
        a mask is anomalous, one without is normal when ``unmasked_test_normal`` else unlabelled.
        """
        if not train and not test:
            raise DataError("upload some images: normal training images and/or test images")
        groups = (("train", train), ("test", test), ("masks", masks))
        missing = [Path(f).name for _, files in groups for f in files or () if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{missing[0]}: the uploaded file is gone (uploads are kept for an hour): upload it again")
        self.ws.check_upload(sum(os.path.getsize(f) for _, files in groups for f in files or ()),
                             len(train) + len(test), voxels=scan_voxels(f for _, files in groups for f in files or ()))
        root = self.uploads / _new_upload_id()
        skipped: list[str] = []
        try:
            for sub, files in groups:
                (root / sub).mkdir(parents=True, exist_ok=True)
                for f in files or ():
                    if not (is_image_name(f) or medical.medical_kind(f)):  # other files would only take disk
                        skipped.append(Path(f).name)
                        continue
                    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(f).name) or "file"
                    shutil.copyfile(f, root / sub / name)
            (root / "manifest.json").write_text(json.dumps({"unmasked_test_normal": bool(unmasked_test_normal)}))
            if skipped:
                (root / SKIPPED_MEMBERS).write_text(json.dumps({"names": skipped[:20], "count": len(skipped)}))
            if not any(any((root / sub).iterdir()) for sub in ("train", "test")):
                raise DataError(f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}: not images, masks "
                                f"or scans ({' '.join(sorted(IMAGE_EXTS))}, DICOM, NIfTI)")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return {"kind": "upload", "id": root.name, "label": f"{len(train)} + {len(test)} uploaded images"}
