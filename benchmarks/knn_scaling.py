"""Exact against HNSW search in PatchCore and AnomalyDINO as the bank grows (200 and 1,000 training images).

Per method and training-set size: one fit on the first N normal images (the quick preset, EfficientNet-Lite0,
224 px), then the same head scores the test images twice, with its kNN
block exact (``knn="exact"``) and approximate (``knn="hnsw"``, faiss HNSW; the index build is timed apart).
The bank is the same for both, so every difference comes from the search:

- ``recall@1``: the share of test patches whose nearest-bank distance is the exact one (relative 1e-4; an
  HNSW miss can only find a farther neighbour);
- ``score_ms``: head time per test image (one pass over the test images, the index built before);
- image and pixel AUROC of each search.

Run (2 threads; ~40 min, most of it AnomalyDINO's exact search at 1,000 images and PatchCore's 10% coreset)::

    UADLAB_CACHE=/tmp/cache-main python benchmarks/knn_scaling.py --data /tmp/demo3000 --json knn.json

Prints one JSON line per (method, N).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from uadlab.backbones import Backbone, backbone_spec
from uadlab.settings import OFFLINE_DEFAULT
from uadlab.data import load_mvtec
from uadlab.methods import get_method_class
from uadlab.metrics import image_metrics, pixel_metrics

SIZE = 224


def timed_score(head, test):
    """(result, ms per test image) of ``head`` on ``test``, its index already built."""
    t0 = time.perf_counter()
    out = head.score(test)
    return out, (time.perf_counter() - t0) * 1000 / len(test)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout folder (e.g. make_demo brick, 224 px, 1,000+ images)")
    p.add_argument("--category", default="brick")
    p.add_argument("--sizes", default="200,1000")
    p.add_argument("--methods", default="anomalydino,patchcore")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = load_mvtec(a.data, categories=[a.category])
    spec = backbone_spec(OFFLINE_DEFAULT, SIZE)
    methods = a.methods.split(",")
    layers = sorted({l for m in methods for l in get_method_class(m).from_preset("quick").layers_for(spec)})
    bb = Backbone(OFFLINE_DEFAULT, layers=layers, image_size=SIZE)
    sizes = [int(x) for x in a.sizes.split(",")]
    train_all = bb.extract([s.load() for s in ds.train[:max(sizes)]], batch_size=16)
    test_all = bb.extract([s.load() for s in ds.test], batch_size=16)
    labels = np.array([s.label for s in ds.test], np.uint8)
    masks = np.stack([bb.mask_transform(m) if (m := s.load_mask()) is not None else np.zeros((SIZE, SIZE), np.uint8)
                      for s in ds.test])
    rows = []
    for n in sizes:
        for name in methods:
            head = get_method_class(name).from_preset("quick", knn="exact")
            mine = head.layers_for(spec)
            t0 = time.perf_counter()
            head.fit(train_all[:n].select(mine))
            row = {"method": name, "n_train": n, "bank": len(head.memory_bank),
                   "fit_s": round(time.perf_counter() - t0, 2)}
            test, results = test_all.select(mine), {}
            for knn in ("exact", "hnsw"):
                head.knn = knn
                t0 = time.perf_counter()
                head.score(test[:1])  # builds the index (cached on the head)
                row[f"{knn}_index_s"] = round(time.perf_counter() - t0, 2)
                res, ms = timed_score(head, test)
                maps, scores = head.heatmap(res, (SIZE, SIZE))
                results[knn] = res.patch_map
                row.update({f"{knn}_score_ms": round(ms, 1),
                            f"{knn}_image_auroc": round(image_metrics(labels, scores.numpy())["image_auroc"], 4),
                            f"{knn}_pixel_auroc": round(pixel_metrics(masks, maps.numpy())["pixel_auroc"], 4)})
            e, h = results["exact"], results["hnsw"]
            row["recall@1"] = round(((h - e).abs() <= 1e-4 * e.abs().clamp_min(1e-12)).float().mean().item(), 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
