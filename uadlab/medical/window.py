"""Intensities and windows: ``Pixels`` (values in modality units before display), a DICOM VOI window, and
``Window``: the run setting fitted on the training images and applied the same way to train and test.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image


PERCENTILES = (0.5, 99.5)
PIXELS_PER_IMAGE = 20_000  # intensities sampled from each training image to fit a percentile window

# Fixed windows in modality units (CT: Hounsfield units), (centre, width) as radiology uses them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}


@dataclass
class Pixels:
    """What a reader gives for one image before display.

    Attributes:
        values: (H, W) float32 in modality units, or (H, W, 3) uint8 for colour images (no window applies).
        voi: the file's own VOI transform (modality units -> [0, 1]), used by the ``auto`` window; a
            Window Center/Width VOI carries them as ``voi.center`` and ``voi.width``.
        invert: MONOCHROME1: high values are dark; applied after the window.
        unit: the modality unit of ``values`` ("HU" for CT, "" for raw values such as MR's).
    """

    values: np.ndarray
    voi: Callable[[np.ndarray], np.ndarray] | None = None
    invert: bool = False
    unit: str = ""

    @property
    def colour(self) -> bool:
        return self.values.ndim == 3


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def voi_window(center: float, width: float, function: str = "LINEAR") -> Callable[[np.ndarray], np.ndarray]:
    """The DICOM VOI window (PS3.3 C.11.2.1.2-3) as a map to [0, 1]: LINEAR, LINEAR_EXACT or SIGMOID."""
    c, w, fn = float(center), float(width), (function or "LINEAR").upper()

    def apply(x: np.ndarray) -> np.ndarray:
        if fn == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1e-6)))
        if fn == "LINEAR_EXACT":
            return np.clip((x - c) / max(w, 1e-6) + 0.5, 0, 1)
        # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; w >= 1 by the standard
        return np.clip((x - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5, 0, 1)

    apply.center, apply.width = c, w  # type: ignore[attr-defined]  # where a viewer starts its window
    return apply


@dataclass(frozen=True)
class Window:
    """An intensity window: how modality units become display values (see the module docstring).

    Attributes:
        spec: the setting as given (``auto``, ``minmax``, ``percentile:0.5,99.5``, ``brain``, ``40/400``).
        lo, hi: the fixed range in modality units (presets, ``C/W``, and percentile windows once fitted).
        percentiles: (low, high) in % for a percentile window.
    """

    spec: str = "auto"
    lo: float | None = None
    hi: float | None = None
    percentiles: tuple[float, float] | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Window":
        """A window from its setting; ValueError naming the setting and what is accepted."""
        s = (spec or "auto").strip().lower()
        if s in ("auto", "minmax"):
            return cls(s)
        if s in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[s]
            return cls(s, c - w / 2, c + w / 2)
        if s.startswith("percentile"):
            rest = s[len("percentile"):].lstrip(":")
            try:
                p = tuple(float(v) for v in rest.split(",")) if rest else PERCENTILES
            except ValueError:
                p = ()
            if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
                raise ValueError(f"window {spec!r}: give percentile:LOW,HIGH with 0 <= LOW < HIGH <= 100")
            return cls(f"percentile:{p[0]:g},{p[1]:g}", percentiles=p)
        c, slash, w = s.partition("/")
        try:
            c_, w_ = float(c), float(w)
            if slash and w_ > 0:
                return cls(s, c_ - w_ / 2, c_ + w_ / 2)
        except ValueError:
            pass
        raise ValueError(f"window {spec!r}: use auto, minmax, percentile[:LOW,HIGH], one of "
                         f"{', '.join(WINDOW_PRESETS)}, or CENTRE/WIDTH such as 40/400")

    def fit(self, samples: Sequence[Any]) -> "Window":
        """This window fitted on the training ``samples`` (objects with ``pixels()``): a percentile window
        takes the percentiles of up to ``PIXELS_PER_IMAGE`` intensities of each; ``auto`` does the same with
        ``PERCENTILES`` over the images WITHOUT a file window (a DICOM file's VOI keeps serving its own file);
        other windows are fixed. Images without intensities (8-bit, colour) do not count (samples with
        ``has_intensities()`` are asked that first, which reads no pixels); with none at all the window stays
        unfitted (``auto`` then renders as before: each image's min/max, PNG/TIFF by their full range)."""
        if self.percentiles is None and self.spec != "auto":
            return self
        percentiles = self.percentiles or PERCENTILES
        rng = np.random.default_rng(0)
        parts = []
        for s in samples:
            if not getattr(s, "has_intensities", lambda: True)():
                continue
            px = s.pixels()
            if px is None or px.colour or (self.spec == "auto" and px.voi is not None):
                continue
            v = px.values.ravel()
            parts.append(v if v.size <= PIXELS_PER_IMAGE else v[rng.choice(v.size, PIXELS_PER_IMAGE, replace=False)])
        if not parts:
            return self
        lo, hi = np.percentile(np.concatenate(parts), percentiles)
        return Window(self.spec, float(lo), float(max(hi, lo + 1e-6)), percentiles)

    def display(self, px: Pixels) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the window, then MONOCHROME1's inversion."""
        x = px.values.astype(np.float32, copy=False)
        if self.spec == "auto" and px.voi is not None:  # the file's own window comes first under auto
            y = px.voi(x)
        elif self.lo is not None:
            y = np.clip((x - self.lo) / (self.hi - self.lo), 0, 1)
        else:  # minmax, auto without a VOI and not fitted, an unfitted percentile window
            y = _minmax(x)
        return (1.0 - y if px.invert else y).astype(np.float32)

    def view_window(self, px: Pixels) -> tuple[float, float]:
        """The (centre, width) in modality units through which this window shows ``px`` (the start of a
        viewer's window / level): a fixed or fitted range, the file's Window Center/Width under ``auto``, else
        the image's own min/max. Not for colour images."""
        voi = px.voi if self.spec == "auto" else None
        if voi is not None and hasattr(voi, "center"):
            return float(voi.center), float(voi.width)
        if self.lo is not None and voi is None:
            return (self.lo + self.hi) / 2, self.hi - self.lo
        v = px.values[np.isfinite(px.values)]
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        return (lo + hi) / 2, max(hi - lo, 1e-6)

    def render(self, px: Pixels) -> Image.Image:
        """8-bit RGB of one image (grey replicated; colour images unchanged)."""
        if px.colour:
            return Image.fromarray(px.values.astype(np.uint8))
        return Image.fromarray((self.display(px) * 255).round().astype(np.uint8)).convert("RGB")

    def key(self) -> str:
        """Part of the feature-cache key: features of another window are other features."""
        return f"window={self.spec}|{self.lo!r}|{self.hi!r}"

    def to_dict(self) -> dict[str, Any]:
        d = {"spec": self.spec, "lo": self.lo, "hi": self.hi, "description": self.describe()}
        if self.percentiles is not None:
            d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Window":
        if not d:
            return cls()
        w = cls.parse(d.get("spec"))
        p = d.get("percentiles")
        return cls(w.spec, d.get("lo", w.lo), d.get("hi", w.hi), tuple(float(v) for v in p) if p else w.percentiles)

    def describe(self) -> str:
        if self.spec == "auto":
            if self.lo is not None:
                p = self.percentiles or PERCENTILES
                return (f"auto: each DICOM file's own window (VOI); other scans and 16-bit images: percentile "
                        f"{p[0]:g}-{p[1]:g} % of the training images' intensities: [{self.lo:.6g}, {self.hi:.6g}] "
                        "modality units")
            return ("auto: each DICOM file's own window (VOI), else each image's min/max (16-bit PNG/TIFF: "
                    "the full 16-bit range)")
        if self.spec == "minmax":
            return "minmax: each image's own min/max"
        rng = f"[{self.lo:.6g}, {self.hi:.6g}] modality units" if self.lo is not None else "not fitted"
        if self.percentiles:
            return (f"percentile {self.percentiles[0]:g}-{self.percentiles[1]:g} % of the training images' "
                    f"intensities: {rng}")
        c, w = (self.lo + self.hi) / 2, self.hi - self.lo
        return f"{self.spec}: centre {c:g}, width {w:g} ({rng})"

    def bind(self, samples: Sequence[Any]) -> list[Any]:
        """Copies of ``samples`` that render through this window (an unfitted ``auto`` leaves them as they are)."""
        if self.spec == "auto" and self.lo is None:
            return list(samples)
        return [replace(s, window=self) for s in samples]
