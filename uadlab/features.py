"""Patch features of a frozen backbone and the on-disk cache that makes "extract once, fit many" true."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed
from .progress import Progress, ProgressFn



@dataclass
class PatchFeatures:
    """Per-layer patch maps of a batch of images.

    Attributes:
        maps: layer name -> (B, C, h, w) float32 map, in the backbone's layer order.
        image_size: (H, W) of the backbone input the maps come from.
        cls: optional (B, C) class token of the last layer.
        backbone: the backbone's fingerprint (name, weights, size, layers), for sanity checks.
    """

    maps: dict[str, torch.Tensor]
    image_size: tuple[int, int]
    cls: torch.Tensor | None = None
    backbone: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.maps:
            raise ValueError("PatchFeatures needs at least one layer map")
        sizes = {m.shape[0] for m in self.maps.values()}
        if len(sizes) != 1:
            raise ValueError(f"all layer maps must have the same batch size, got {sorted(sizes)}")

    def __len__(self) -> int:
        return next(iter(self.maps.values())).shape[0]

    @property
    def layers(self) -> list[str]:
        return list(self.maps)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the finest layer map."""
        return max((tuple(m.shape[-2:]) for m in self.maps.values()), key=lambda s: s[0] * s[1])

    def __getitem__(self, idx) -> "PatchFeatures":
        """Select images along the batch axis (int, slice, list or bool/long tensor)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return PatchFeatures(
            {k: v[idx] for k, v in self.maps.items()},
            self.image_size,
            None if self.cls is None else self.cls[idx],
            self.backbone,
            dict(self.meta),
        )

    def select(self, layers: Sequence[str]) -> "PatchFeatures":
        """Keep only the named layers (a KeyError names the missing one and what exists)."""
        missing = [l for l in layers if l not in self.maps]
        if missing:
            raise KeyError(f"layers {missing} not in features (have {self.layers})")
        return PatchFeatures({l: self.maps[l] for l in layers}, self.image_size, self.cls, self.backbone, dict(self.meta))

    def stacked(self, layers: Sequence[str] | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Concatenate layers along channels after bilinear resampling to one grid -> (B, sum C, h, w)."""
        layers = list(layers) if layers is not None else self.layers
        grid = grid or self.select(layers).grid
        out = []
        for l in layers:
            m = self.maps[l]
            if tuple(m.shape[-2:]) != tuple(grid):
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            out.append(m)
        return torch.cat(out, dim=1)

    @staticmethod
    def cat(items: Iterable["PatchFeatures"], release: bool = False) -> "PatchFeatures":
        """Concatenate along the batch axis into preallocated tensors. With ``release`` (``items`` a list) each
        item is dropped from the list once copied, so the peak holds about one copy of the features, not two
        (1,000 Lite0 images at 224 px: 203 MB less)."""
        if not isinstance(items, list) or not release:
            items = list(items)
        if not items:
            raise ValueError("nothing to concatenate")
        first, total = items[0], sum(len(it) for it in items)
        maps = {l: torch.empty((total, *m.shape[1:]), dtype=m.dtype) for l, m in first.maps.items()}
        cls = None if first.cls is None else torch.empty((total, *first.cls.shape[1:]), dtype=first.cls.dtype)
        meta, size, backbone, row = dict(first.meta), first.image_size, first.backbone, 0
        for i, it in enumerate(items):
            if it.layers != list(maps) or it.image_size != size:
                raise ValueError("cannot concatenate features of different layers or image sizes")
            for l, m in it.maps.items():
                maps[l][row:row + len(it)] = m
            if cls is not None:
                cls[row:row + len(it)] = it.cls
            row += len(it)
            if release:
                items[i] = None  # type: ignore[call-overload]
        return PatchFeatures(maps, size, cls, backbone, meta)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through a temporary file unique to this writer, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class FeatureCache:
    """On-disk cache of per-image features, keyed by backbone fingerprint and image content.

    Each entry is one safetensors file (never pickle) at ``root/<backbone-hash>/<image-hash>.safetensors``,
    its layer names and input size in the file's metadata. Writes are atomic: every writer fills its own
    temporary file and renames it into place, so concurrent writers of one key (threads or processes) never
    collide and readers never see a partial entry. When the cache grows past ``max_bytes`` the least
    recently used entries are evicted.

    Args:
        root: cache folder (created if missing).
        max_bytes: size cap; ``None`` means unbounded.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = 2 * 1024**3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def _dir(self, fingerprint: str) -> Path:
        d = self.root / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        d.mkdir(exist_ok=True)
        fp = d / "backbone.json"
        if not fp.exists():
            _atomic_write(fp, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint})))
        return d

    def get(self, fingerprint: str, key: str) -> PatchFeatures | None:
        path = self._dir(fingerprint) / f"{key}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            maps = {l: tensors[f"map.{l}"] for l in json.loads(meta["layers"])}
            size = tuple(json.loads(meta["image_size"]))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a damaged (or old-format) entry is a miss, not a crash
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # LRU bookkeeping
        except OSError:
            pass  # evicted meanwhile: the tensors are already in memory
        return PatchFeatures(maps, size, tensors.get("cls"), fingerprint)

    def put(self, fingerprint: str, key: str, feats: PatchFeatures) -> None:
        assert len(feats) == 1, "cache entries hold one image"
        tensors = {f"map.{l}": m.contiguous() for l, m in feats.maps.items()}
        if feats.cls is not None:
            tensors["cls"] = feats.cls.contiguous()
        meta = {"layers": json.dumps(feats.layers), "image_size": json.dumps(list(feats.image_size))}
        _atomic_write(self._dir(fingerprint) / f"{key}.safetensors",
                      lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry that still exists (others may evict concurrently)."""
        out = []
        for p in self.root.rglob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out

    def size_bytes(self) -> int:
        return sum(n for _, n, _ in self._entries())

    def evict(self) -> int:
        """Remove least recently used entries until the cache fits ``max_bytes``; returns how many went."""
        if self.max_bytes is None:
            return 0
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(n for _, n, _ in entries)
        removed = 0
        for _, n, p in entries:
            if total <= self.max_bytes:
                break
            total -= n
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def extract(
        self,
        backbone,
        samples: Sequence,
        batch_size: int = 16,
        progress: ProgressFn | None = None,
    ) -> PatchFeatures:
        """Features of ``samples`` (objects with ``load()`` -> PIL and ``content_key()``), from cache or backbone.

        Under torchrun each rank extracts its shard (``distributed.shard``) and every rank receives all of them,
        in order (``distributed.all_gather_cat``): the ranks share the backbone's work, not a file system.

        Returns:
            PatchFeatures of all samples in order; ``meta["backbone_s"]`` holds the seconds spent in the backbone
            (by this rank).
        """
        if distributed.is_distributed() and len(samples) >= distributed.world_size():
            mine = self._extract(backbone, samples[distributed.shard(len(samples))], batch_size, progress)
            return PatchFeatures({l: distributed.all_gather_cat(m) for l, m in mine.maps.items()}, mine.image_size,
                                None if mine.cls is None else distributed.all_gather_cat(mine.cls), mine.backbone,
                                dict(mine.meta))
        return self._extract(backbone, samples, batch_size, progress)

    def _extract(self, backbone, samples: Sequence, batch_size: int, progress: ProgressFn | None) -> PatchFeatures:
        fp = backbone.fingerprint
        out: list[PatchFeatures | None] = []
        todo: list[int] = []
        keys = [s.content_key() for s in samples]
        for i, k in enumerate(keys):
            f = self.get(fp, k)
            out.append(f)
            if f is None:
                todo.append(i)
        self.hits += len(samples) - len(todo)
        self.misses += len(todo)
        spent = 0.0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            x = torch.stack([backbone.transform(samples[i].load()) for i in chunk])
            t0 = time.perf_counter()
            feats = backbone(x)
            spent += time.perf_counter() - t0
            for j, i in enumerate(chunk):
                one = feats[j]
                self.put(fp, keys[i], one)
                out[i] = one
            if progress is not None:
                progress(Progress(min(start + batch_size, len(todo)), len(todo), "images"))
        self.evict()
        res = PatchFeatures.cat(out, release=True)  # type: ignore[arg-type]
        res.backbone = fp
        res.meta["backbone_s"] = spent
        res.meta["extracted"] = len(todo)
        return res
