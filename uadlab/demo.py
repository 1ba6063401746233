"""An offline demo dataset in the MVTec AD layout: real textures with synthetic defects and exact masks.

Normal images are random crops (with flips) of scikit-image's real photographs of brick, grass and
gravel; a small colour tint per category makes them RGB. Test defects, each with its exact mask:
``scratch`` (a thin bright or dark polyline), ``hole`` (a dark blob with a soft rim), ``patch`` (a piece
of another texture pasted in) and ``color`` (a hue shift inside a blob). Deterministic by seed.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .settings import demo_dir

CATEGORIES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "hole", "patch", "color")
_LOCK = threading.Lock()
_TINT = {"brick": (1.0, 0.78, 0.62), "grass": (0.72, 1.0, 0.62), "gravel": (0.9, 0.9, 1.0)}


def _texture(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)().astype(np.float32) / 255.0  # (512, 512) grayscale photograph
    return img


def _crop(tex: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = tex.shape
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    c = tex[y:y + size, x:x + size]
    if rng.random() < 0.5:
        c = c[:, ::-1]
    if rng.random() < 0.5:
        c = c[::-1]
    return np.ascontiguousarray(c)


def _rgb(gray: np.ndarray, cat: str) -> np.ndarray:
    return np.clip(gray[..., None] * np.array(_TINT[cat], np.float32), 0, 1)


def _blob_mask(size: int, rng: np.random.Generator, rmin: float, rmax: float) -> np.ndarray:
    """A random ellipse-ish blob (union of 3 ellipses) as a bool mask."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    for _ in range(3):
        rx, ry = rng.uniform(rmin, rmax, 2) * size
        ox, oy = rng.normal(0, rmin * size * 0.5, 2)
        d.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    return np.array(im) > 127


def _defect(img: np.ndarray, kind: str, cat: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply one synthetic defect to an RGB float image; return (image, bool mask)."""
    img = img.copy()
    if kind == "scratch":
        im = Image.new("L", (size, size), 0)
        pts = [tuple(rng.uniform(0.15, 0.85, 2) * size)]
        for _ in range(3):
            step = rng.uniform(0.1, 0.25, 2) * size * rng.choice([-1, 1], 2)
            pts.append(tuple(np.clip(np.array(pts[-1]) + step, 2, size - 3)))
        ImageDraw.Draw(im).line(pts, fill=255, width=max(2, size // 48))
        mask = np.array(im) > 127
        value = 0.95 if rng.random() < 0.5 else 0.05
        img[mask] = value
    elif kind == "hole":
        mask = _blob_mask(size, rng, 0.05, 0.1)
        soft = np.array(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(2))) / 255.0
        img = img * (1 - 0.85 * soft[..., None])
        mask = soft > 0.5
    elif kind == "patch":
        other = [c for c in CATEGORIES if c != cat][int(rng.integers(0, len(CATEGORIES) - 1))]
        src = _rgb(_crop(_texture(other), size, rng), other)
        mask = _blob_mask(size, rng, 0.06, 0.12)
        img[mask] = src[mask]
    elif kind == "color":
        mask = _blob_mask(size, rng, 0.06, 0.12)
        shift = np.array(rng.permutation([1.35, 0.6, 0.8]), np.float32)
        img[mask] = np.clip(img[mask] * shift, 0, 1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {DEFECTS}")
    return img, mask


def make_demo(
    root: str | os.PathLike | None = None,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = 30,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    size: int = 160,
    seed: int = 0,
) -> Path:
    """Write (or reuse) the demo dataset and return its root folder (MVTec layout per category).

    Args:
        root: output folder; default ``~/.cache/uadlab/demo/<params>``. Reused if already complete.
        categories: subset of ``CATEGORIES``.
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_per_defect: anomalous test images per defect kind and category.
        size: side of the square images in pixels.
        seed: everything is deterministic given the seed.
    """
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown demo categories {bad}; known: {CATEGORIES}")
    params = dict(categories=list(categories), n_train=n_train, n_test_good=n_test_good,
                  n_test_per_defect=n_test_per_defect, size=size, seed=seed, version=1)
    if root is None:
        tag = "-".join(str(v) if not isinstance(v, list) else "+".join(v) for v in params.values())
        root = demo_dir() / tag
    root = Path(root)
    with _LOCK:  # one writer per process; the folder appears complete or not at all (a rename)
        if _complete(root, params):
            return root
        tmp = root.with_name(f".{root.name}.{uuid.uuid4().hex[:8]}")
        _write(tmp, params)
        shutil.rmtree(root, ignore_errors=True)  # an incomplete copy of an older version
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _complete(root: Path, params: dict) -> bool:
    stamp = root / "demo.json"
    try:
        return json.loads(stamp.read_text()) == params
    except (OSError, ValueError):
        return False


def _write(root: Path, params: dict) -> None:
    seed, size = params["seed"], params["size"]
    for cat in params["categories"]:
        rng = np.random.default_rng([seed, CATEGORIES.index(cat)])
        tex = _texture(cat)

        def save(arr: np.ndarray, path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)

        for i in range(params["n_train"]):
            save(_rgb(_crop(tex, size, rng), cat), root / cat / "train" / "good" / f"{i:03d}.png")
        for i in range(params["n_test_good"]):
            save(_rgb(_crop(tex, size, rng), cat), root / cat / "test" / "good" / f"{i:03d}.png")
        for kind in DEFECTS:
            for i in range(params["n_test_per_defect"]):
                img, mask = _defect(_rgb(_crop(tex, size, rng), cat), kind, cat, size, rng)
                save(img, root / cat / "test" / kind / f"{i:03d}.png")
                save(mask.astype(np.float32), root / cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    (root / "demo.json").write_text(json.dumps(params))
