"""A HARD synthetic set from the demo's real textures: anomalies that are darker, smoother or lower in
contrast than the normal texture, and whole normal images darkened by 20% that must NOT score high.

The demo's defects (uadlab.demo) are easy: bright scratches, pasted textures. Real defects are often the
opposite: a smooth, dark, low-contrast region. A model that scores "unpredictable" or "bright / textured"
instead of "unlike normal" ranks such images BELOW normal ones, which this set exposes.

Labels: 0 = normal (``kind`` "good" or "darkened": the whole image x 0.8), 1 = anomalous ("dark_smooth":
a soft blob where the texture is blurred and darkened to 55%; "low_contrast": a soft blob where the texture
keeps its local mean but only 25% of its contrast). Deterministic by seed. Shared helper for the tests.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from uadlab.demo import _blob_mask, _crop, _rgb, _texture

KINDS = ("good", "darkened", "dark_smooth", "low_contrast")


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def hard_image(tex: np.ndarray, cat: str, kind: str, size: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """One RGB float image of ``kind`` and its bool mask (all False for the normal kinds)."""
    img = _rgb(_crop(tex, size, rng), cat)
    mask = np.zeros((size, size), bool)
    if kind == "good":
        return img, mask
    if kind == "darkened":  # a global brightness change of a NORMAL image: not a defect
        return img * 0.8, mask
    mask = _blob_mask(size, rng, 0.1, 0.16)
    soft = _blur(mask.astype(np.float32), max(1.0, size / 80))[..., None]  # soft rim, as real stains have
    smooth = _blur(img, size / 24)  # the local mean: texture removed
    if kind == "dark_smooth":
        inside = 0.55 * smooth
    elif kind == "low_contrast":
        inside = smooth + 0.25 * (img - smooth)
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    return img * (1 - soft) + inside * soft, soft[..., 0] > 0.5


def hard_set(category: str = "brick", size: int = 96, n_train: int = 16, n_per_kind: int = 6, seed: int = 0
             ) -> tuple[list[Image.Image], list[Image.Image], np.ndarray, list[str], np.ndarray]:
    """Normal training images and a test set of ``n_per_kind`` images of each of ``KINDS``.

    Returns:
        train, test (PIL RGB), labels (n_test,) 0/1, kinds (n_test,), masks (n_test, size, size) bool.
    """
    rng = np.random.default_rng([seed, 7])
    tex = _texture(category)
    to_pil = lambda a: Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))  # noqa: E731
    train = [to_pil(hard_image(tex, category, "good", size, rng)[0]) for _ in range(n_train)]
    test, kinds, masks = [], [], []
    for kind in KINDS:
        for _ in range(n_per_kind):
            img, m = hard_image(tex, category, kind, size, rng)
            test.append(to_pil(img))
            kinds.append(kind)
            masks.append(m)
    labels = np.array([int(k not in ("good", "darkened")) for k in kinds])
    return train, test, labels, kinds, np.stack(masks)
