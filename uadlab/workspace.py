"""Per-user workspaces behind the app: data sources, runs, scoring caches, annotations, explanations.

Layout on disk (root from ``UADLAB_WORKSPACE``, default ``./workspace``; never served to the web)::

    <root>/uadlab.sqlite              annotations and reviews of every user (see store.py)
    <root>/users/<user>/data.json     the current data source (never a token)
    <root>/users/<user>/uploads/<id>/ unpacked uploads
    <root>/users/<user>/runs/<run>/   saved runs (pipeline.Run.save)

A user is a random hex id kept in the browser, so a reload finds the same workspace while other browsers
do not see it. Models never live in per-session state: the app keeps ids, and this module keeps a small
LRU of loaded runs keyed by (user, run id). Every use of a workspace touches its folder; ``sweep`` deletes
workspaces untouched for ``UADLAB_EXPIRE_DAYS`` (their annotations too). Limits: see safety.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .data import (IMAGE_EXTS, DataError, Dataset, Sample, is_mvtec, load_folder, load_hf, load_mvtec, safe_extract_zip,
                   validate)
from .methods import get_method_class, list_methods
from .safety import (TRAININGS, QuotaError, confine, disk_usage, export_path, hub_id, limits, megabytes, public_text,
                     remove_stale_exports, resolve_local_folder, workspace_root)
from .progress import Progress, ProgressFn, Stages, quiet, within
from .store import AnnotationStore
from .viz import GridRow, compare_grid

_USER_RE = re.compile(r"^[0-9a-f]{8,64}$")
_ID_RE = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


def browser_secret(root: str | Path | None = None) -> str:
    """The key that encrypts the workspace id kept in the browser, stable across app restarts.

    From ``UADLAB_BROWSER_SECRET`` or a file created once in the workspace root (``.browser_secret``);
    a random key per start (gradio's default) would make every browser lose its workspace on a restart.
    """
    env = os.environ.get("UADLAB_BROWSER_SECRET")
    if env:
        return env
    root = Path(root) if root is not None else workspace_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".browser_secret"
    if not path.exists():
        import secrets

        tmp = root / f".browser_secret.{uuid.uuid4().hex}"
        tmp.write_text(secrets.token_hex(16))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic create: two processes starting together agree on one key
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_text().strip()


def new_user_id() -> str:
    return uuid.uuid4().hex


def valid_user_id(user: Any) -> bool:
    return isinstance(user, str) and bool(_USER_RE.match(user))


def demo_kwargs() -> dict[str, Any]:
    """Arguments of ``make_demo`` for the app's demo data (env ``UADLAB_DEMO`` as JSON, e.g. smaller for tests)."""
    raw = os.environ.get("UADLAB_DEMO", "")
    return json.loads(raw) if raw.strip() else {}


class LRU:
    """A small thread-safe least-recently-used cache shared by all sessions of the process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()  # outside the lock: loading a run must not block other users
        self.put(key, value)
        return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def drop(self, match: Callable[[Any], bool]) -> None:
        with self._lock:
            for k in [k for k in self._d if match(k)]:
                del self._d[k]


_DATASETS = LRU(16)  # (user, data choice json) -> Dataset (lazy samples: cheap)
_RUNS = LRU(4)  # (user, run id) -> Run (holds heads and a backbone: the expensive part)
_SCORED = LRU(32)  # (user, run id, sample names) -> {method: Scored}, views


# ---- data sources ---------------------------------------------------------------------------------------
def open_source(choice: dict[str, Any], uploads: Path, token: str | None = None) -> Dataset:
    """A dataset from a data choice (``{"kind": "demo" | "folder" | "upload" | "hf", ...}``), category applied."""
    kind = choice.get("kind")
    if kind == "demo":
        from .demo import make_demo

        ds = load_mvtec(make_demo(**demo_kwargs()), skip_bad=True)
        ds.name = "demo"
    elif kind == "folder":
        p = resolve_local_folder(str(choice.get("path") or ""))
        ds = _confined(load_mvtec(p, skip_bad=True) if is_mvtec(p) else load_folder(p, skip_bad=True), p)
    elif kind == "upload":
        uid = str(choice.get("id", ""))
        if not _ID_RE.match(uid) or not (uploads / uid).is_dir():
            raise DataError(f"upload {uid!r} is no longer in this workspace: upload it again")
        ds = _open_upload(uploads / uid)
    elif kind == "hf":
        repo = hub_id(choice.get("repo"), "dataset")
        opt = lambda k: (str(choice.get(k) or "").strip() or None)  # noqa: E731
        cap = limits().upload_images
        ds = load_hf(repo, split=opt("split") or "train", test_split=opt("test_split"),
                     image_column=opt("image_column") or "image", label_column=opt("label_column"),
                     mask_column=opt("mask_column"), category_column=opt("category_column"), config=opt("config"),
                     token=token or None, limit=min(int(choice.get("limit") or cap), cap), skip_bad=True)
    else:
        raise DataError(f"unknown data source {kind!r}")
    cat = choice.get("category")
    if cat and cat != "all" and len(ds.categories) > 1:
        if cat not in ds.categories:
            raise DataError(f"{ds.name}: no category {cat!r} (have {', '.join(ds.categories)})")
        ds = ds.category(cat)
    return ds


def _confined(ds: Dataset, folder: Path) -> Dataset:
    """``ds`` without the samples whose image or mask is a link to a file outside ``folder``."""
    keep = lambda s: confine([s.path, s.mask_path], folder)  # noqa: E731
    dropped = [s.name for s in ds.train + ds.test if not keep(s)]
    return Dataset(ds.name, [s for s in ds.train if keep(s)], [s for s in ds.test if keep(s)],
                   ds.warnings + [f"skipped {n}: a link to a file outside the folder" for n in dropped])


def _open_upload(root: Path) -> Dataset:
    manifest = root / "manifest.json"
    if manifest.exists():  # loose files: train/, test/, masks/
        info = json.loads(manifest.read_text())
        warn: list[str] = []
        files = lambda sub: sorted(p for p in (root / sub).glob("*") if p.is_file())  # noqa: E731
        masks = {}
        for p in files("masks"):
            stem = p.stem[:-5] if p.stem.endswith("_mask") else p.stem
            masks[stem] = str(p)
        train = [Sample(p.name, str(p), label=0, category="upload") for p in files("train")]
        test = []
        for p in files("test"):
            m = masks.get(p.stem)
            label = 1 if m else (0 if info.get("unmasked_test_normal") else -1)
            test.append(Sample(p.name, str(p), label=label, mask_path=m, category="upload",
                               defect="defect" if m else ("good" if label == 0 else "")))
        ds = Dataset("upload", validate(train, True, warn), validate(test, True, warn), warn)
        if not ds.train and not ds.test:
            raise DataError("the upload holds no usable images")
        return ds
    inner = [p for p in root.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    files = [p for p in root.iterdir() if p.is_file()]
    if len(inner) == 1 and not files:
        root = inner[0]  # zips usually wrap everything in one folder
    return load_mvtec(root, skip_bad=True) if is_mvtec(root) else load_folder(root, skip_bad=True)


def dataset_key(choice: dict[str, Any]) -> str:
    """A stable name of a data choice, used to key annotations (e.g. ``demo/brick``)."""
    kind = choice.get("kind", "?")
    base = {"demo": "demo", "folder": f"folder:{choice.get('path', '')}", "upload": f"upload:{choice.get('id', '')}",
            "hf": f"hf:{choice.get('repo', '')}"}.get(kind, kind)
    return f"{base}/{choice.get('category') or 'all'}"


def default_selection(samples: Sequence[Sample], n: int = 5) -> list[str]:
    """A few test images worth looking at: one normal, then one per defect type (then any)."""
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


# ---- editor values ----------------------------------------------------------------------------------------
def editor_value(image: Image.Image, mask: np.ndarray | None) -> dict[str, Any]:
    """An ImageEditor value: the image with the saved mask (if any) tinted red as the background.

    The saved mask is part of the background (the editor does not reliably show preset layers); new brush
    strokes arrive as layers and are ADDED to the saved mask on save (see ``Workspace.save_annotation``).
    """
    from .viz import mask_overlay

    rgb = np.asarray(image.convert("RGB"))
    if mask is not None and mask.shape == rgb.shape[:2]:
        rgb = mask_overlay(rgb, mask, colour=(255, 0, 0), alpha=0.5)
    bg = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    return {"background": bg, "layers": [], "composite": None}


def mask_from_editor(value: Any, size: tuple[int, int]) -> np.ndarray | None:
    """The painted mask (any layer pixel with alpha > 0) at ``size`` = (W, H); None when nothing is painted."""
    if not isinstance(value, dict):
        return None
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        a = np.asarray(layer)
        m = a[..., 3] > 0 if a.ndim == 3 and a.shape[-1] == 4 else (a.max(-1) if a.ndim == 3 else a) > 0
        painted = m if painted is None else painted | m
    if painted is None or not painted.any():
        return None
    if painted.shape != (size[1], size[0]):
        painted = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return painted.astype(np.uint8)


# ---- the workspace -------------------------------------------------------------------------------------------
class Workspace:
    """Everything one user owns: current data, uploads, runs, annotations.

    Args:
        user: the user's random hex id (validated: it becomes a folder name).
        root: the workspace root (default: ``workspace_root()``).
    """

    def __init__(self, user: str, root: str | Path | None = None) -> None:
        if not valid_user_id(user):
            raise ValueError("invalid workspace id (expected 8 to 64 hex characters)")
        self.user = user
        self.root = Path(root) if root is not None else workspace_root()
        self.dir = self.root / "users" / user
        self.uploads = self.dir / "uploads"
        self.runs_dir = self.dir / "runs"
        for d in (self.uploads, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.utime(self.dir)  # "last used": the expiry sweep keeps workspaces touched within UADLAB_EXPIRE_DAYS
        self.store = AnnotationStore(self.root / "uadlab.sqlite")

    # ---- data ---------------------------------------------------------------------------------------------
    def data_choice(self) -> dict[str, Any] | None:
        p = self.dir / "data.json"
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (OSError, json.JSONDecodeError):
            return None

    def dataset(self, choice: dict[str, Any] | None = None, token: str | None = None) -> Dataset:
        """The dataset of ``choice`` (default: the current one), cached per user."""
        choice = choice or self.data_choice()
        if choice is None:
            raise DataError("no data loaded yet: choose a data source in the Data tab")
        key = (self.user, json.dumps(choice, sort_keys=True))
        return _DATASETS.get(key, lambda: open_source(choice, self.uploads, token))

    def set_data(self, choice: dict[str, Any], token: str | None = None, new_upload: bool = False) -> Dataset:
        """Open a data source, make it the current one (saved to disk, without any token) and return it.

        Args:
            new_upload: ``choice`` is an upload just added: when it does not open, its folder is removed at once
                (nothing could choose it again).
        """
        choice = {k: v for k, v in choice.items() if k != "token"}
        _DATASETS.drop(lambda k: k == (self.user, json.dumps(choice, sort_keys=True)))
        try:
            ds = self.dataset(choice, token)
            if not ds.train and not ds.test:
                raise DataError(f"{ds.name}: no usable images")
        except Exception:
            if new_upload and choice.get("kind") == "upload" and _ID_RE.match(str(choice.get("id", ""))):
                shutil.rmtree(self.uploads / choice["id"], ignore_errors=True)
            raise
        tmp = self.dir / "data.json.tmp"
        tmp.write_text(json.dumps(choice))
        os.replace(tmp, self.dir / "data.json")
        return ds

    def full_dataset(self, choice: dict[str, Any]) -> Dataset:
        """The data choice with every category (for auxiliary sets of zero-shot methods)."""
        return self.dataset({**choice, "category": "all"})

    def check_upload(self, size: int, images: int, unpacked: int | None = None) -> int:
        """Refuse an upload past the limits (QuotaError saying which); return the workspace's free bytes."""
        lim = limits()
        if size > lim.upload_bytes:
            raise QuotaError(f"the upload is {megabytes(size)}; the limit per upload is {megabytes(lim.upload_bytes)}")
        if images > lim.upload_images:
            raise QuotaError(f"the upload holds {images} images; the limit per upload is {lim.upload_images}")
        return self.check_disk(size if unpacked is None else unpacked)

    def check_disk(self, extra: int = 0) -> int:
        """Refuse to add ``extra`` bytes past the workspace's disk limit; return the free bytes."""
        lim = limits()
        used = disk_usage(self.dir)
        if used + extra > lim.workspace_bytes:
            expiry = f"; workspaces unused for {lim.expire_days:g} days are deleted" if lim.expire_days else ""
            raise QuotaError(f"this workspace is full: it holds {megabytes(used)} of {megabytes(lim.workspace_bytes)}"
                             f"{f' and this needs {megabytes(extra)} more' if extra else ''}{expiry}")
        return lim.workspace_bytes - used

    def add_zip(self, zip_path: str | os.PathLike) -> dict[str, Any]:
        """Unpack an uploaded zip (safely, within the limits) into a new upload folder; return its data choice."""
        import zipfile

        try:
            with zipfile.ZipFile(zip_path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{Path(zip_path).name}: not a valid zip file ({e})") from None
        images = sum(Path(i.filename).suffix.lower() in IMAGE_EXTS for i in infos)
        free = self.check_upload(os.path.getsize(zip_path), images, sum(i.file_size for i in infos))
        uid = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        try:
            safe_extract_zip(zip_path, self.uploads / uid, max_bytes=free)  # the sizes in a zip's header can lie
        except BaseException:
            shutil.rmtree(self.uploads / uid, ignore_errors=True)
            raise
        return {"kind": "upload", "id": uid}

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
        self.check_upload(sum(os.path.getsize(f) for _, files in groups for f in files or ()),
                          len(train) + len(test))
        uid = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        root = self.uploads / uid
        try:
            for sub, files in groups:
                (root / sub).mkdir(parents=True, exist_ok=True)
                for f in files or ():
                    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(f).name) or "file"
                    shutil.copyfile(f, root / sub / name)
            (root / "manifest.json").write_text(json.dumps({"unmasked_test_normal": bool(unmasked_test_normal)}))
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return {"kind": "upload", "id": uid}

    # ---- runs -----------------------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        from .pipeline import list_runs

        return list_runs(self.runs_dir)

    def run_choices(self) -> list[tuple[str, str]]:
        out = []
        for m in self.runs():
            cfg = m.get("config", {})
            when = time.strftime("%m-%d %H:%M", time.localtime(m.get("created", 0)))
            data = public_text(m.get("dataset_key", "?"), self.root)
            out.append((f"{when} · {data} · {cfg.get('backbone')} · {'+'.join(cfg.get('methods', []))} "
                        f"({m['run_id'][:6]})", m["run_id"]))
        return out

    def run(self, run_id: str):
        """A saved run of this user, loaded once and kept in the process-wide LRU."""
        from .pipeline import Run

        if not run_id or not _ID_RE.match(str(run_id)):
            raise ValueError("choose a run (train one in the Train tab)")
        path = self.runs_dir / run_id
        if not (path / "run.json").exists():
            raise ValueError(f"run {run_id} is not in this workspace")
        return _RUNS.get((self.user, run_id), lambda: Run.load(path))

    def run_dataset(self, run_id: str) -> Dataset:
        run = self.run(run_id)
        choice = getattr(run, "meta", {}).get("data")
        if not choice:
            raise DataError(f"run {run_id} does not record its data source")
        return self.dataset(choice)

    def train(self, methods: Sequence[str], backbone: str | None = None, preset: str = "quick",
              image_size: int | None = None, aux_source: str = "other categories", token: str | None = None,
              progress: ProgressFn | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
        """Fit the chosen heads on the current data, evaluate on its labelled test images, save; return
        (run id, evaluation)."""
        from .pipeline import Run, RunConfig

        if not methods:
            raise ValueError("select at least one method")
        unknown = [m for m in methods if m not in list_methods()]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list_methods()}")
        choice = self.data_choice()
        ds = self.dataset(choice, token)
        if not ds.train and not all(get_method_class(m).zero_shot for m in methods):
            raise DataError(f"{ds.name}: no normal training images")
        aux = None
        if any(get_method_class(m).zero_shot for m in methods):
            aux = self.aux_set(choice, aux_source)
        self.check_disk()
        lim = limits()
        with TRAININGS.hold(self.user, lim.trainings_per_workspace, lim.trainings):
            run = Run(RunConfig.resolve(methods, preset, backbone or None, image_size or None), workdir=self.runs_dir,
                      token=token or None)
            run.fit(ds.train, within(progress, 0.0, 0.85), aux=aux)
            evaluation: dict[str, dict[str, Any]] = {}
            labelled = [s for s in ds.test if s.label in (0, 1)]
            if labelled:
                step = Stages(within(progress, 0.85, 0.99), [1]).stage(f"evaluating on {len(labelled)} labelled test images")
                evaluation = run.evaluate(labelled, progress=step)
            run.save({"data": choice, "dataset_key": dataset_key(choice), "dataset": ds.summary(),
                      "evaluation": evaluation})
        run._token = None  # the token served this call only; the cached run must not keep it
        _RUNS.put((self.user, run.run_id), run)
        (progress or quiet)(Progress(1, 1, stage="saved", overall=1.0))
        return run.run_id, evaluation

    def aux_set(self, choice: dict[str, Any], source: str) -> list[Sample]:
        """The auxiliary labelled set of zero-shot methods: other categories' test images, or annotations."""
        if source == "annotations":
            aux = self.store.to_samples(self.user, dataset_key(choice), require_masks=True)
            where = "your annotations of this dataset"
        else:
            cat = choice.get("category")
            if not cat or cat == "all":
                raise DataError("the auxiliary set 'other categories' needs one target category: choose a category "
                                "in the Data tab (the others then serve as the labelled set), or use annotations")
            from .pipeline import auxiliary_set

            aux = auxiliary_set(self.full_dataset(choice), [cat])
            where = "the other categories' test images"
        if not any(s.label == 1 for s in aux) or not any(s.label == 0 for s in aux):
            raise DataError(f"a zero-shot method needs an auxiliary labelled set with normal and anomalous "
                            f"(masked) images; {where} gave {len(aux)} usable images")
        return aux

    def evaluation(self, run_id: str, labels: str = "dataset") -> dict[str, dict[str, Any]]:
        """The run's metrics with the dataset's test labels (saved at training) or with the user's annotations."""
        run = self.run(run_id)
        meta = getattr(run, "meta", {})
        if labels == "annotations":
            key = meta.get("dataset_key") or dataset_key(meta.get("data", {}))
            samples = self.store.to_samples(self.user, key)
            if not samples:
                raise ValueError("no annotations with a normal/anomalous label for this run's dataset yet")
            return run.evaluate(samples, record=False)
        return meta.get("evaluation") or {}

    # ---- scoring and pictures --------------------------------------------------------------------------------
    def scored(self, run_id: str, samples: Sequence[Sample]) -> tuple[dict[str, Any], list[np.ndarray]]:
        """({method: Scored}, views) of ``samples`` under a run; cached per (user, run, images)."""
        run = self.run(run_id)
        key = (self.user, run_id, tuple(s.name for s in samples), tuple(s.content_key()[:8] for s in samples))

        def make():
            views = [run.backbone.view(s.load()) for s in samples]
            return run.score(list(samples)), views

        return _SCORED.get(key, make)

    def grid_rows(self, run_id: str, names: Sequence[str], ds: Dataset | None = None) -> tuple[list[GridRow], list[str]]:
        """Grid rows of the named test images of the run's dataset (or ``ds``) and the run's method names."""
        run = self.run(run_id)
        ds = ds or self.run_dataset(run_id)
        by_name = {s.name: s for s in ds.test}
        samples = [by_name[n] for n in names if n in by_name]
        if not samples:
            raise ValueError("select at least one test image")
        scored, views = self.scored(run_id, samples)
        rows = []
        for i, s in enumerate(samples):
            m = s.load_mask()
            rows.append(GridRow(s.name, views[i], None if m is None else run.backbone.mask_transform(m),
                                {k: v.maps[i] for k, v in scored.items()},
                                {k: float(v.scores[i]) for k, v in scored.items()}, describe(s)))
        return rows, list(scored)

    def compare(self, run_id: str, names: Sequence[str], threshold: float = 1.0) -> tuple[Image.Image, Image.Image]:
        """(heatmap grid, predicted-mask grid) of the named test images on the shared calibrated scale."""
        rows, methods = self.grid_rows(run_id, names)
        return compare_grid(rows, methods, "heatmap"), compare_grid(rows, methods, "mask", threshold)

    def example_heatmap(self, run_id: str, method: str) -> Image.Image:
        """One anomalous test image with its ground truth and ``method``'s heatmap (for model cards)."""
        ds = self.run_dataset(run_id)
        pick = next((s for s in ds.test if s.label == 1), ds.test[0] if ds.test else None)
        if pick is None:
            raise ValueError("the run's dataset has no test images for an example")
        rows, _ = self.grid_rows(run_id, [pick.name], ds)
        return compare_grid(rows, [method], "heatmap", cell=200)

    def explain(self, run_id: str, name: str, method: str) -> list[tuple[np.ndarray, str]]:
        """The method's named explanation images for one test image ([] when the method has none)."""
        from .viz import explanation_image, overlay

        run = self.run(run_id)
        if method not in run.heads:
            raise ValueError(f"run {run_id} has no {method} head")
        ds = self.run_dataset(run_id)
        sample = next((s for s in ds.test if s.name == name), None)
        if sample is None:
            raise ValueError(f"{name}: not a test image of this run's dataset")
        head = run.heads[method]
        feats = run.features([sample])
        out = head.explain(feats.select(head.layers_for(run.backbone.spec)))
        scored, views = self.scored(run_id, [sample])
        gallery = [(overlay(views[0], scored[method].maps[0]), f"{method}: heatmap (shared scale)")]
        return gallery + [(explanation_image(v), str(k)) for k, v in (out or {}).items()]

    # ---- annotate & review ------------------------------------------------------------------------------------
    def prefs(self) -> dict[str, Any]:
        p = self.dir / "prefs.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def set_pref(self, key: str, value: Any) -> None:
        prefs = {**self.prefs(), key: value}
        tmp = self.dir / "prefs.json.tmp"
        tmp.write_text(json.dumps(prefs))
        os.replace(tmp, self.dir / "prefs.json")

    def to_annotate(self) -> tuple[list[Sample], str]:
        """The images to annotate (the current data's test split, else its train split) and the dataset key."""
        choice = self.data_choice()
        ds = self.dataset(choice)
        return (ds.test or ds.train), dataset_key(choice)

    def annotation_at(self, idx: int):
        """(sample, stored annotation or None, dataset key, number of images) at position ``idx``."""
        samples, key = self.to_annotate()
        if not samples:
            raise DataError("the current data has no images to annotate")
        idx = int(min(max(int(idx or 0), 0), len(samples) - 1))
        s = samples[idx]
        return s, self.store.get(self.user, key, s.name), key, len(samples)

    def save_annotation(self, idx: int, label: str | None, painted: np.ndarray | None, note: str = "",
                        run_id: str | None = None, agree: Sequence[str] = (), disagree: Sequence[str] = (),
                        clear_mask: bool = False):
        """Save label, mask, note and verdicts of the image at ``idx`` (committed at once); return the annotation.

        Args:
            painted: newly painted pixels; they are added to the saved mask (None: the mask stays as it is).
            clear_mask: drop the saved mask first.
        """
        s, old, key, _ = self.annotation_at(idx)
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
            for m in self.run(run_id).heads:
                verdict = "agree" if m in agree else "disagree" if m in disagree else None
                self.store.set_review(self.user, key, s.name, run_id, m, verdict)
        self.set_pref("annotate_index", int(idx))
        return ann

    def review_panel(self, run_id: str, sample: Sample, threshold: float = 1.0) -> list[tuple[np.ndarray, str]]:
        """Each method's heatmap (shared scale) and its predicted mask at ``threshold`` for one image."""
        from .viz import mask_overlay, overlay, predicted_mask

        scored, views = self.scored(run_id, [sample])
        out = []
        for m, sc in scored.items():
            heat = sc.maps[0]
            out.append((overlay(views[0], heat), f"{m}: heatmap, score {sc.scores[0]:.2f}"))
            out.append((mask_overlay(views[0], predicted_mask(heat, threshold), colour=(0, 200, 255)),
                        f"{m}: mask at {threshold:g}"))
        return out

    def export_annotations(self) -> Path:
        """The current dataset's annotations (with its normal training images) as an MVTec-layout zip.

        Written to a private temp folder (never the workspace, which is not served); the app hands it to gradio,
        which serves a copy to this session only, and ``sweep`` removes it after an hour.
        """
        choice = self.data_choice()
        ds = self.dataset(choice)
        key = dataset_key(choice)
        if not self.store.list(self.user, key):
            raise ValueError("nothing annotated in this dataset yet")
        cat = str(choice.get("category") or "annotated")
        cat = "annotated" if cat == "all" else cat
        out = export_path(f"annotations-{cat}-{time.strftime('%Y%m%d-%H%M%S')}.zip")
        return self.store.export_mvtec_zip(self.user, key, out, category=cat, train=ds.train)


# ---- expiry ---------------------------------------------------------------------------------------------------
def expire_workspaces(days: float | None = None, root: str | Path | None = None, now: float | None = None) -> list[str]:
    """Delete the workspaces untouched for ``days`` (default ``UADLAB_EXPIRE_DAYS``; 0: never), files and
    annotations; a workspace that is training is kept. Returns the deleted ids."""
    days = limits().expire_days if days is None else days
    root = Path(root) if root is not None else workspace_root()
    users = root / "users"
    if days <= 0 or not users.is_dir():
        return []
    cutoff = (now or time.time()) - days * 86400
    busy = TRAININGS.busy()
    gone = []
    for d in users.iterdir():
        try:
            old = d.stat().st_mtime < cutoff
        except OSError:
            continue
        if old and valid_user_id(d.name) and d.name not in busy:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    if gone:
        store = AnnotationStore(root / "uadlab.sqlite")
        for user in gone:
            store.delete_user(user)
        for lru in (_DATASETS, _RUNS, _SCORED):
            lru.drop(lambda k: k[0] in gone)
    return gone


def sweep() -> None:
    """Delete expired workspaces and export temp files older than an hour (run at start, then hourly)."""
    expire_workspaces()
    remove_stale_exports()


def start_sweeper(every: float = 3600) -> threading.Thread:
    """Run ``sweep`` now and then every ``every`` seconds in a daemon thread."""
    import logging

    def loop() -> None:
        while True:
            try:
                sweep()
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the next one
                logging.getLogger("uadlab.workspace").exception("workspace sweep failed")
            time.sleep(every)

    t = threading.Thread(target=loop, name="uadlab-sweep", daemon=True)
    t.start()
    return t
