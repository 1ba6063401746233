"""uadlab's PatchCore against anomalib 2.7's, on the same backbone features, in one process.

The backbone runs ONCE: uadlab's EfficientNet-Lite0 (``uadlab.settings.OFFLINE_DEFAULT``, the packaged ImageNet
weights) gives the stage2 + stage3 maps that uadlab's PatchCore reads (``PatchCore.layers_for``). Both heads are
then fit on those maps, one after the other, on the same threads:

- uadlab: ``PatchCore.from_preset("quick")`` (coreset 10%): per-channel 3x3 neighbourhood mean
  (``neighbourhood_mean``), lazy greedy coreset (``kcenter_greedy``) on a dense random projection to 128 dims,
  exact or HNSW nearest-neighbour index; image score = largest squared patch distance.
- anomalib 2.7: ``PatchcoreModel`` (its defaults: ``AvgPool2d(3, 1, 1)`` per layer, ``generate_embedding``,
  ``num_neighbors=9``), fit through its own ``forward`` in training mode and ``subsample_embedding``
  (``KCenterGreedy`` on a sparse random projection of Johnson-Lindenstrauss size, eps 0.9), scored through its
  own ``forward`` in eval mode (``nearest_neighbors``, the paper's re-weighted image score, nearest upsampling and
  Gaussian blur sigma 4). Its ``TimmFeatureExtractor`` is replaced by a module that hands over our maps: the
  script first checks that anomalib's extractor, given the same Lite0 weights (``layers=[2, 3]``, timm's
  out_indices of stage2/stage3), computes the same maps on two training images.

Same geometry: anomalib has no pretrain/target-dim pooling, so its patch vector is the 3x3 mean of each layer,
coarser layer resampled bilinearly, concatenated (40 + 112 = 152 dims for Lite0). uadlab's quick preset
(``pretrain_dim=None``; ``target_dim=1024`` only pools vectors wider than 1024, so not here) computes the same
vector: the script checks this too (``embed_max_abs_diff``). The coresets differ in their projection (uadlab:
dense 152 -> 128; anomalib: sparse 152 -> 4 ln(N) / (eps^2/2 - eps^3/3) dims, e.g. 295 for N = 156,800) and
in their start (uadlab: mean distance to 10 random points, anomalib: one random point). Both AUROCs use
``uadlab.metrics`` on the 224 px maps and the masks through the backbone's geometry.

Allocator: glibc raises its mmap threshold (up to 32 MB) after large blocks are freed, so what ran before
(the backbone) changes where later temporaries go. In this process anomalib's ``KCenterGreedy`` at 20 images
(a 15 MB ``features - center`` per step) then fragmented the heap: 17.5 GB peak RSS and 54-79 s instead of
1.4 GB and ~25 s. The script therefore pins the threshold at glibc's default 128 KiB (``mallopt``) before
anything runs, for both heads (``--no-pin-malloc`` leaves glibc's dynamic threshold alone). From ~45 images
anomalib's per-step temporary is above 32 MB and always mmapped, so the pin matters only for small runs.

``fit_s`` is the head's fit on the extracted features: for uadlab ``PatchCore.fit`` (embedding, projection,
coreset, bank, nearest-neighbour index); for anomalib the training-mode ``forward`` over all batches of 32
(pooling, ``generate_embedding``, reshape, store) plus ``subsample_embedding``. ``ratio`` = anomalib / uadlab.

Install anomalib 2.7.0 in a separate venv that shares /work/venv's packages (torch is NOT reinstalled)::

    python3 -m venv /work/venv-anomalib
    echo /work/venv/lib/python3.11/site-packages \\
        > /work/venv-anomalib/lib/python3.11/site-packages/shared_venv.pth
    /work/venv-anomalib/bin/pip install --no-deps anomalib==2.7.0 "jsonargparse<4.47.0" omegaconf==2.4.0 \\
        lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 opencv-python-headless kornia==0.9.0 \\
        kornia_rs matplotlib pyparsing cycler kiwisolver fonttools platformdirs einops FrEIA

(``--no-deps`` because anomalib's dependencies would pull another torch; this is the set its PatchCore import path
needs. The .pth line only adds the other venv's site-packages, not its editable installs: run with PYTHONPATH.)

Run (2 threads; ``--which uadlab`` also runs in /work/venv without anomalib)::

    PYTHONPATH=/path/to/uadlab UADLAB_CACHE=/tmp/cache-bench /work/venv-anomalib/bin/python \\
        benchmarks/patchcore_vs_anomalib.py --n-train 200 --data /tmp/demo1000 --json /tmp/pc200.json

Without ``--data`` it writes (or reuses) ``uadlab.demo.make_demo`` brick at 224 px with ``--n-train`` training
images; with ``--data`` (an MVTec-layout folder) it takes the first ``--n-train`` training images of
``--category``. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset loop draws a tqdm bar per point otherwise

import numpy as np
import torch

from uadlab.backbones import Backbone, backbone_spec
from uadlab.settings import OFFLINE_DEFAULT
from uadlab.data import Sample, load_mvtec
from uadlab.demo import make_demo
from uadlab.features import PatchFeatures
from uadlab.methods.patchcore import PatchCore, neighbourhood_mean
from uadlab.metrics import image_metrics, pixel_metrics

IMAGE_SIZE = 224
DUMMY = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)  # anomalib's forward reads only its shape (the maps' output size)
ANOMALIB_BATCH = 32  # anomalib's default train/eval batch size


def pin_malloc_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) so that the allocation history does not change it
    (see the module docstring); False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_samples(data: str | None, category: str, n_train: int) -> tuple[list[Sample], list[Sample]]:
    """The first ``n_train`` training images of ``category`` and all its test images."""
    root = Path(data) if data else make_demo(categories=(category,), n_train=n_train, size=IMAGE_SIZE)
    ds = load_mvtec(root, categories=[category])
    if len(ds.train) < n_train:
        raise SystemExit(f"{root}: only {len(ds.train)} training images of {category}, asked for {n_train}")
    return ds.train[:n_train], ds.test


def extract(bb: Backbone, samples: list[Sample]) -> PatchFeatures:
    return bb.extract([s.load() for s in samples], batch_size=16)


def ground_truth(bb: Backbone, test: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Image labels (N,) and pixel masks (N, S, S) through the backbone's geometry (as its input images)."""
    labels = np.array([s.label for s in test], np.uint8)
    masks = []
    for s in test:
        m = s.load_mask()
        masks.append(bb.mask_transform(m) if m is not None else np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8))
    return labels, np.stack(masks)


def metrics(labels: np.ndarray, masks: np.ndarray, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
    im = image_metrics(labels, scores.numpy())
    px = pixel_metrics(masks, maps.numpy())
    return {"image_auroc": im["image_auroc"], "pixel_auroc": px["pixel_auroc"], "aupro": px["aupro"]}


def run_uadlab(train: PatchFeatures, test: PatchFeatures, layers: list[str], coreset: float) -> dict[str, Any]:
    model = PatchCore.from_preset("quick", coreset_ratio=coreset, layers=layers)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, scores = model.heatmap(model.score(test), (IMAGE_SIZE, IMAGE_SIZE))
    score_s = time.perf_counter() - t0
    return dict(fit_s=fit_s, score_s=score_s, bank=len(model.memory_bank), dim=int(model.memory_bank.shape[1]),
                proj_dim=model.proj_dim, train_patches=model.fit_info["train_patches"],
                knn=model.knn, scores=scores.float(), maps=maps.float())


class FedFeatures(torch.nn.Module):
    """Stands in for anomalib's ``TimmFeatureExtractor``: returns the backbone maps set in ``maps`` (extracted
    once by uadlab's backbone), so anomalib's own forward runs on them and the backbone is not timed."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.maps


def anomalib_model(bb: Backbone, layers: list[str], check: list[Sample], check_feats: PatchFeatures):
    """anomalib's PatchcoreModel on Lite0's stages, with two checks on ``check`` images: its own extractor with
    our weights gives our maps, and its embedding equals uadlab's ``neighbourhood_mean``."""
    import anomalib
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    idx = [int(l[len("stage"):]) for l in layers]  # timm out_indices, as uadlab's Backbone builds them
    model = PatchcoreModel(layers=idx, backbone=bb.model_name, pre_trained=False)
    ext = model.feature_extractor.feature_extractor
    ext.load_state_dict(bb.model.state_dict())
    x = torch.stack([bb.transform(s.load()) for s in check])
    with torch.no_grad():
        theirs = model.feature_extractor(x)
        ours = {i: check_feats.maps[l] for i, l in zip(idx, layers)}
        extractor_diff = max(float((theirs[i] - ours[i]).abs().max()) for i in idx)
        emb = model.generate_embedding({i: model.feature_pooler(m) for i, m in ours.items()})
        embed_diff = float((emb.permute(0, 2, 3, 1) - neighbourhood_mean(check_feats, layers)).abs().max())
    model.feature_extractor = FedFeatures()
    return model, dict(anomalib_version=anomalib.__version__, extractor_max_abs_diff=extractor_diff,
                       embed_max_abs_diff=embed_diff)


def _batches(feats: PatchFeatures, layers: list[str], idx: list[int]):
    for s in range(0, len(feats), ANOMALIB_BATCH):
        yield {i: feats.maps[l][s:s + ANOMALIB_BATCH] for i, l in zip(idx, layers)}


def run_anomalib(model, train: PatchFeatures, test: PatchFeatures, layers: list[str], coreset: float,
                 seed: int) -> dict[str, Any]:
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    torch.manual_seed(seed)  # KCenterGreedy's start and the sparse projection draw from torch's and numpy's RNGs
    np.random.seed(seed)
    t0 = time.perf_counter()
    _anomalib_embed(model, train, layers)
    embed_s = time.perf_counter() - t0
    n_patches, dim = sum(len(e) for e in model.embedding_store), model.embedding_store[0].shape[1]
    with torch.no_grad():
        model.subsample_embedding(coreset)
    fit_s = time.perf_counter() - t0
    model.eval()
    scores, maps_out = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for maps in _batches(test, layers, list(model.layers)):
            model.feature_extractor.maps = maps
            out = model(DUMMY.expand(len(next(iter(maps.values()))), -1, -1, -1))
            scores.append(out.pred_score.reshape(-1))
            maps_out.append(out.anomaly_map[:, 0])
    score_s = time.perf_counter() - t0
    return dict(fit_s=fit_s, embed_s=embed_s, coreset_s=fit_s - embed_s, score_s=score_s,
                bank=len(model.memory_bank), dim=int(dim), train_patches=int(n_patches),
                proj_dim=int(SparseRandomProjection._johnson_lindenstrauss_min_dim(n_patches, eps=0.9)),
                scores=torch.cat(scores).float(), maps=torch.cat(maps_out).float())


def _anomalib_embed(model, train: PatchFeatures, layers: list[str]) -> None:
    """anomalib's training-mode ``forward`` over all batches: pooling, ``generate_embedding``, store."""
    model.train()
    with torch.no_grad():
        for maps in _batches(train, layers, list(model.layers)):
            model.feature_extractor.maps = maps
            model(DUMMY.expand(len(next(iter(maps.values()))), -1, -1, -1))


def run_anomalib_capped(model, train: PatchFeatures, layers: list[str], coreset: float, steps: int,
                        seed: int) -> dict[str, Any]:
    """anomalib's fit time when the full run would take hours: its embedding, then its ``KCenterGreedy`` on the
    whole embedding for ``steps`` and ``2 * steps`` selections; every selection costs the same (one distance
    update over all N rows), so the full selection is extrapolated linearly from the difference."""
    from anomalib.models.components.sampling import KCenterGreedy

    t0 = time.perf_counter()
    _anomalib_embed(model, train, layers)
    embedding = torch.vstack(model.embedding_store)
    embed_s = time.perf_counter() - t0
    n_total, times = int(len(embedding) * coreset), []
    for k in (steps, 2 * steps):
        torch.manual_seed(seed)
        np.random.seed(seed)
        t0 = time.perf_counter()
        KCenterGreedy(embedding, k / len(embedding)).select_coreset_idxs()
        times.append(time.perf_counter() - t0)
    per_step = (times[1] - times[0]) / steps
    return dict(embed_s=embed_s, coreset_steps_measured=[steps, 2 * steps], coreset_s_measured=times,
                s_per_step=per_step, bank=n_total, train_patches=len(embedding),
                fit_s_extrapolated=embed_s + times[0] + per_step * (n_total - steps))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--coreset", type=float, default=0.1, help="coreset ratio for both (default 0.1)")
    p.add_argument("--data", default=None, help="MVTec-layout folder (default: make_demo brick, 224 px)")
    p.add_argument("--category", default="brick")
    p.add_argument("--which", choices=("uadlab", "anomalib", "both"), default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-pin-malloc", action="store_true", help="leave glibc's dynamic mmap threshold alone")
    p.add_argument("--anomalib-steps", type=int, default=None, metavar="K",
                   help="time only K and 2K of anomalib's coreset selections and extrapolate its fit (no AUROC)")
    a = p.parse_args(argv)
    pinned = False if a.no_pin_malloc else pin_malloc_threshold()

    torch.set_num_threads(a.threads)
    try:
        import faiss
        faiss.omp_set_num_threads(a.threads)
    except ImportError:
        pass
    t0 = time.perf_counter()
    train_s, test_s = load_samples(a.data, a.category, a.n_train)
    layers = PatchCore().layers_for(backbone_spec(OFFLINE_DEFAULT, IMAGE_SIZE))
    bb = Backbone(OFFLINE_DEFAULT, layers=layers, image_size=IMAGE_SIZE)
    train, test = extract(bb, train_s), extract(bb, test_s)
    labels, masks = ground_truth(bb, test_s)
    out: dict[str, Any] = dict(
        n_train=a.n_train, n_test=len(test_s), n_test_anomalous=int(labels.sum()), category=a.category,
        data=a.data or "make_demo", image_size=IMAGE_SIZE, backbone=OFFLINE_DEFAULT, layers=layers,
        grid=list(train.select(layers).grid), coreset=a.coreset, threads=a.threads, torch=torch.__version__,
        cpu=platform.processor() or platform.machine(), malloc_pinned=pinned, features_s=round(time.perf_counter() - t0, 2))
    if a.which in ("anomalib", "both"):  # built before either fit, so both fits see the same process state
        model, info = anomalib_model(bb, layers, train_s[:2], train[:2])
        out.update(info)
    del bb
    for name in ("uadlab", "anomalib"):
        if a.which not in (name, "both"):
            continue
        if name == "anomalib" and a.anomalib_steps:
            out[name] = run_anomalib_capped(model, train, layers, a.coreset, a.anomalib_steps, a.seed)
            print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
            continue
        r = run_uadlab(train, test, layers, a.coreset) if name == "uadlab" else \
            run_anomalib(model, train, test, layers, a.coreset, a.seed)
        m = metrics(labels, masks, r.pop("scores"), r.pop("maps"))
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in {**r, **m}.items()}
        out[name]["peak_rss_mb"] = round(peak_rss_mb())
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    if a.which == "both" and a.anomalib_steps:
        out["ratio_extrapolated"] = round(out["anomalib"]["fit_s_extrapolated"] / out["uadlab"]["fit_s"], 2)
    elif a.which == "both":
        out["ratio"] = round(out["anomalib"]["fit_s"] / out["uadlab"]["fit_s"], 2)
        out["d_image_auroc"] = round(out["uadlab"]["image_auroc"] - out["anomalib"]["image_auroc"], 4)
        out["d_pixel_auroc"] = round(out["uadlab"]["pixel_auroc"] - out["anomalib"]["pixel_auroc"], 4)
    line = json.dumps(out)
    print(line, flush=True)
    if a.json:
        Path(a.json).write_text(line + "\n")
    return out


if __name__ == "__main__":
    main()
