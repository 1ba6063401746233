"""Does "1.0 = the normal limit" keep its promise? False alarms of the calibrated image threshold on UNSEEN
normal images, against the split-conformal promise, for n = 5, 20 and 200 held-out normal images.

Normal images are random crops of a real texture (scikit-image's brick, as in the demo); a run is fitted on
n of them with the default protocol (refit: K-fold cross-fitting, the shipped head fitted on all n), and the
share of 1,000 other normal images scoring above 1.0 is its observed false-alarm rate. Repeated over random
draws of the n images (the promise is over the draw of the held-out images), mean and spread reported.

    python benchmarks/false_alarms.py --methods patchcore,anomalydino --size 64 --repeats 20
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from uadlab.data import Sample
from uadlab.demo import _crop, _rgb, _texture
from uadlab.features import FeatureCache
from uadlab.pipeline import Run, RunConfig
from uadlab.postprocess import conformal_rank


def normal_images(n: int, size: int, seed: int, category: str = "brick") -> list[Sample]:
    rng = np.random.default_rng([seed, 11])
    tex = _texture(category)
    out = []
    for i in range(n):
        a = _rgb(_crop(tex, size, rng), category)
        out.append(Sample(f"{category}/normal{seed}_{i}", image=Image.fromarray((np.clip(a, 0, 1) * 255).round()
                                                                                 .astype(np.uint8)), label=0,
                          category=category))
    return out


def measure(methods: list[str], ns: list[int], alphas: dict[int, float], size: int, repeats: int, n_unseen: int,
            cache: FeatureCache, seed: int = 0) -> list[dict]:
    pool = normal_images(max(ns), size, seed)
    unseen = normal_images(n_unseen, size, seed + 1)
    rows = []
    for n in ns:
        for alpha in sorted({alphas[n], 0.01}, reverse=True):
            obs: dict[str, list[float]] = {m: [] for m in methods}
            statement = {}
            reps = repeats if n < max(ns) else max(1, repeats // 4)
            for r in range(reps):
                pick = np.random.default_rng([seed, n, r]).choice(len(pool), n, replace=False)
                run = Run(RunConfig(methods=methods, image_size=size, alpha=alpha, seed=r), cache=cache)
                run.fit([pool[i] for i in sorted(pick)])
                out = run.score(unseen)
                for m in methods:
                    cal = run.calibration[m]
                    statement[m] = cal
                    if cal.calibrated:
                        obs[m].append(float((out[m].scores > 1.0).mean()))
            for m in methods:
                cal = statement[m]
                k = conformal_rank(n, alpha)
                rows.append(dict(method=m, n=n, alpha=alpha, protocol=cal.protocol, rank=k if k <= n else None,
                                 promised=cal.promised, repeats=len(obs[m]),
                                 observed=float(np.mean(obs[m])) if obs[m] else None,
                                 observed_sd=float(np.std(obs[m])) if obs[m] else None,
                                 text=None if cal.calibrated else cal.statement.split(". ")[0]))
                print(rows[-1], file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | n held-out | alpha asked | protocol | promised (1 - k/(n+1)) | observed on unseen normals |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        got = (f"{r['observed']:.4f} ± {r['observed_sd']:.4f} ({r['repeats']} draws)" if r["observed"] is not None
               else r["text"])
        lines.append(f"| {r['method']} | {r['n']} | {r['alpha']:g} | {r['protocol']} | "
                     f"{'%.4f' % r['promised'] if r['promised'] is not None else 'cannot be calibrated'} | {got} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="patchcore,anomalydino")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--unseen", type=int, default=1000)
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(a.methods.split(","), [5, 20, 200], {5: 0.2, 20: 0.05, 200: 0.01}, a.size, a.repeats,
                       a.unseen, FeatureCache(Path(tmp)))
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
