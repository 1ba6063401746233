"""The ``uadlab`` command line: fit, score, eval, bench, app."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .backbones import OFFLINE_DEFAULT


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="short name (dinov2_vits14, dinov3_vits16, efficientnet_lite0 "
                   "...) or any timm model name; default: efficientnet_lite0, or the paper's with --preset paper")
    p.add_argument("--weights", default="default", help="default | hub | packaged | random | PATH")
    p.add_argument("--image-size", type=int, default=None, help="center-crop side (default 224, or the paper's "
                   "with --preset paper)")
    p.add_argument("--resize", type=int, default=None, help="resize side before the center crop")
    p.add_argument("--preset", default="quick", help="quick | paper | tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method hyperparameter, e.g. dinomaly.dropout=0 or dinomaly.groups='\"dense\"' "
                   "(VALUE is JSON, else a string); repeatable")


def resolve_inputs(a, methods: list[str]) -> None:
    """Fill in ``a.backbone``, ``a.image_size`` and ``a.resize`` where the user left them unset.

    With ``--preset paper`` and methods that agree on their paper's backbone, the paper's backbone and input
    geometry (e.g. Dinomaly: DINOv2-reg ViT-B/14, resize 448, crop 392); otherwise the offline default
    backbone at 224 px. The paper's geometry is never applied to a backbone the user chose otherwise.
    """
    from .methods import get_method_class

    inputs = [get_method_class(m).paper_inputs for m in methods] if a.preset == "paper" else []
    paper = inputs[0] if inputs and all(i == inputs[0] for i in inputs) else {}
    if paper and a.backbone in (None, paper["backbone"]):
        a.backbone = paper["backbone"]
        if a.image_size is None:
            a.image_size, a.resize = paper["image_size"], a.resize or paper.get("resize")
        print(f"paper inputs: {a.backbone}, resize {a.resize}, crop {a.image_size}", file=sys.stderr)
    a.backbone = a.backbone or OFFLINE_DEFAULT
    a.image_size = a.image_size or 224


def parse_params(items: list[str]) -> dict[str, dict]:
    """``["dinomaly.dropout=0", "dinomaly.attention=softmax"]`` -> ``{"dinomaly": {"dropout": 0, ...}}``."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (eq and dot and method and name):
            raise ValueError(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. dinomaly.dropout=0")
        try:
            out.setdefault(method, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(method, {})[name] = value
    return out


def _progress(frac: float, msg: str) -> None:
    sys.stderr.write(f"\r[{frac * 100:5.1f}%] {msg[:100]:100s}")
    sys.stderr.flush()
    if frac >= 1:
        sys.stderr.write("\n")


def cmd_fit(a) -> int:
    from .data import load_data
    from .pipeline import Run, RunConfig, auxiliary_set

    ds = load_data(a.data, categories=a.categories.split(",") if a.categories else None, skip_bad=a.skip_bad)
    methods = a.methods.split(",")
    resolve_inputs(a, methods)
    run = Run(RunConfig(backbone=a.backbone, methods=methods, preset=a.preset, image_size=a.image_size,
                        resize=a.resize, weights=a.weights, seed=a.seed, method_kwargs=parse_params(a.param)),
              workdir=a.out)
    aux = None
    if any(h.zero_shot for h in run.heads.values()):  # other categories only, never the target's test images
        aux = auxiliary_set(load_data(a.data, skip_bad=a.skip_bad) if a.categories else ds, ds.categories)
    run.fit(ds.train[: a.train_limit] if a.train_limit else ds.train, _progress, aux=aux)
    path = run.save({"dataset": ds.summary()})
    print(f"saved run {run.run_id} to {path}")
    return 0


def cmd_score(a) -> int:
    from .data import Sample, load_data, load_files
    from .pipeline import Run

    run = Run.load(a.run)
    p = Path(a.images)
    samples = load_data(str(p)).train if p.is_dir() else load_files([str(p)])
    out = run.score(samples)
    rows = [{"image": s.name, **{m: float(sc.scores[i]) for m, sc in out.items()}} for i, s in enumerate(samples)]
    print(json.dumps(rows, indent=2))
    return 0


def cmd_eval(a) -> int:
    from .bench import markdown
    from .data import load_data
    from .pipeline import Run

    run = Run.load(a.run)
    ds = load_data(a.data, categories=a.categories.split(",") if a.categories else None)
    res = run.evaluate(ds.test)
    rows = [{"method": m, "category": ",".join(ds.categories), **{k: v for k, v in r.items() if k != "curves"},
             "backbone_ms": None, "peak_rss_mb": None} for m, r in res.items()]
    print(markdown(rows))
    return 0


def cmd_bench(a) -> int:
    from .bench import markdown, run_bench, write_json

    t0 = time.perf_counter()
    methods = a.methods.split(",")
    resolve_inputs(a, methods)
    rows = run_bench(a.data, a.backbone, methods, weights=a.weights,
                     categories=a.categories.split(",") if a.categories else None, multi_class=a.multi_class,
                     image_size=a.image_size, resize=a.resize, preset=a.preset, train_limit=a.train_limit,
                     seed=a.seed, method_kwargs=parse_params(a.param), log=lambda m: print(m, file=sys.stderr))
    print(markdown(rows))
    if a.json:
        write_json(rows, a.json, {"args": {k: v for k, v in vars(a).items() if k != "func"},
                                  "total_s": time.perf_counter() - t0})
    return 0


def cmd_app(a) -> int:
    os.environ.setdefault("UADLAB_WORKSPACE", a.workspace)
    app_path = Path(__file__).resolve().parent.parent / "app.py"
    if not app_path.exists():
        print("app.py not found next to the uadlab package (install from a source checkout)", file=sys.stderr)
        return 2
    import runpy

    sys.argv = [str(app_path), "--port", str(a.port)] + (["--share"] if a.share else [])
    runpy.run_path(str(app_path), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="uadlab", description="Unsupervised anomaly detection on frozen features")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fit", help="train heads on normal images and save the run")
    p.add_argument("--data", default="demo", help="demo | FOLDER | ZIP | hf:REPO_ID")
    p.add_argument("--methods", default="patchcore,anomalydino")
    p.add_argument("--categories", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--out", default="runs")
    _common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a saved run")
    p.add_argument("--run", required=True)
    p.add_argument("images", help="an image or a folder of images")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="metrics of a saved run on a labelled test set")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default="demo")
    p.add_argument("--categories", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="compare methods on one dataset, backbone and cache")
    p.add_argument("--data", default="demo", help="demo | FOLDER (MVTec layout) | hf:REPO_ID")
    p.add_argument("--methods", default="patchcore,anomalydino")
    p.add_argument("--categories", default=None)
    p.add_argument("--multi-class", action="store_true", help="one model for all categories")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--json", default=None)
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("app", help="start the Gradio app")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")
    p.add_argument("--workspace", default="workspace")
    p.set_defaults(func=cmd_app)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .backbones import BackboneWeightsError

    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (DataError, BackboneWeightsError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"uadlab {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
