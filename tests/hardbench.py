"""Image / pixel AUROC of methods on the hard synthetic set (tests/harddata.py), through the real ``Run``.

    OMP_NUM_THREADS=1 python tests/hardbench.py --methods spatial_ar varad patchcore --textures brick grass gravel

Each texture is one run (refit calibration, the quick preset unless ``--preset``); ``token_mean`` is the
no-model baseline (standardised squared distance of each token to the mean normal token of the training
features, on the Lite0 stage-3 grid). Prints one row per method: mean over textures, then per texture.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harddata import hard_set  # noqa: E402

from uadlab.data import Sample  # noqa: E402
from uadlab.features import FeatureCache  # noqa: E402
from uadlab.metrics import image_metrics, pixel_metrics  # noqa: E402
from uadlab.pipeline import Run, RunConfig, masks_at  # noqa: E402
from uadlab.postprocess import to_heatmap, image_score  # noqa: E402


def token_mean(run: Run, train: list[Sample], test: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """The no-model baseline on the backbone's stage-3 tokens: (scores, maps) at the network size."""
    f_tr, f_te = run.features(train).select(["stage3"]), run.features(test).select(["stage3"])
    a, t = f_tr.maps["stage3"].float(), f_te.maps["stage3"].float()
    mu, sd = a.mean((0, 2, 3), keepdim=True), a.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    pm = ((t - mu) / sd).pow(2).mean(1)  # (B, h, w)
    maps = to_heatmap(pm, f_te.image_size, 4.0)
    return image_score(maps, "top1").numpy(), maps.numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["spatial_ar", "varad", "patchcore"])
    ap.add_argument("--textures", nargs="+", default=["brick", "grass", "gravel"])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-per-kind", type=int, default=8)
    ap.add_argument("--calibration", default="refit")
    ap.add_argument("--kw", default="{}", help='JSON method_kwargs, e.g. {"spatial_ar": {"mode": "causal"}}')
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    fit_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tex in args.textures:
            tr, te, labels, kinds, masks = hard_set(tex, size=args.size, n_train=args.n_train,
                                                    n_per_kind=args.n_per_kind, seed=args.seed)
            train = [Sample(f"train{i}", image=im, label=0, category=tex) for i, im in enumerate(tr)]
            test = [Sample(f"{k}{i}", image=im, label=int(l), mask=m.astype(np.uint8) * 255, category=tex)
                    for i, (im, l, k, m) in enumerate(zip(te, labels, kinds, masks))]
            cfg = RunConfig(methods=list(args.methods), preset=args.preset, image_size=args.size,
                            calibration=args.calibration, seed=args.seed, method_kwargs=json.loads(args.kw))
            run = Run(cfg, cache=FeatureCache(Path(tmp) / "cache"))
            run.fit(train)
            for name, r in run.evaluate(test, record=False).items():
                rows.setdefault(name, {})[tex] = (r["image_auroc"], r["pixel_auroc"])
                fit_s[name] = fit_s.get(name, 0.0) + run.info["fit_s"][name] + \
                    run.info.get("calibration_fit_s", {}).get(name, 0.0)
                rec = run.heads[name].fit_record.train
                if rec is not None:
                    print(f"  {tex} {name}: best_epoch {rec.best_epoch}, steps {rec.steps}", file=sys.stderr)
            s, m = token_mean(run, train, test)
            gt = masks_at(run.backbone, test)
            rows.setdefault("token_mean", {})[tex] = (image_metrics(labels, s)["image_auroc"],
                                                      pixel_metrics(gt, m)["pixel_auroc"])
    print(f"| method | image AUROC | pixel AUROC | fit s | " + " | ".join(args.textures) + " |")
    print("|---|---|---|---|" + "---|" * len(args.textures))
    for name, per in rows.items():
        img, px = np.mean([v[0] for v in per.values()]), np.mean([v[1] for v in per.values()])
        cells = " | ".join(f"{per[t][0]:.3f} / {per[t][1]:.3f}" for t in args.textures)
        print(f"| {name} | {img:.3f} | {px:.3f} | {fit_s.get(name, 0):.0f} | {cells} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
