"""The ``uadlab`` command line: fit, score, eval, bench, app.

Bad input (a flag, a file, a dataset, a saved run) ends the command with exit code 2 and ONE line on
stderr that names the problem; never a traceback (set ``UADLAB_DEBUG=1`` to see one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
import typing
import warnings
from pathlib import Path

from . import distributed, settings
from .progress import Progress
from .settings import MAX_SIDE, MIN_SIDE, check_side


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _side(value: str) -> int:
    """An image side in px for ``--image-size`` / ``--resize``, checked by the run settings' one rule
    (``settings.check_side``) as soon as it is parsed: a bad size stops the command before any work."""
    try:
        side = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of pixels") from None
    try:
        return check_side("side", side)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("side ")) from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="short name (dinov2_vits14, dinov3_vits16, efficientnet_lite0 "
                   "...) or any timm model name; default: efficientnet_lite0, or the paper's with --preset paper")
    p.add_argument("--weights", default=None, help="default | hub | packaged | random | PATH (default: default)")
    p.add_argument("--image-size", type=_side, default=None, help=f"center-crop side, {MIN_SIDE} to {MAX_SIDE} px "
                   "(default: the preset's geometry; with --preset paper each method's paper's)")
    p.add_argument("--resize", type=_side, default=None, help="resize side before the center crop")
    p.add_argument("--preset", default="quick", help="quick | paper | tiny (paper: each method with its paper's "
                   "backbone and input geometry, several backbones in one run if the papers differ)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--window", default=None, help="intensity window of DICOM / NIfTI / 16-bit images: auto (the "
                   "DICOM file's own, else a 0.5-99.5 %% percentile window fitted on the training images), minmax, "
                   "percentile[:LO,HI] (fitted on the training "
                   "images, default 0.5,99.5), brain, soft_tissue, lung, bone (CT presets), or CENTRE/WIDTH")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method hyperparameter, e.g. dinomaly.dropout=0 or dinomaly.groups='\"dense\"' "
                   "(VALUE is JSON, else a string); repeatable")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="how the feature cache stores features (float16: half the memory, measured lossless enough)")


def _data_args(p: argparse.ArgumentParser, help: str = "demo | FOLDER | ZIP | hf:REPO_ID") -> None:
    p.add_argument("--data", default="demo", help=help)
    p.add_argument("--categories", default=None)
    p.add_argument("--hf-streaming", action="store_true", help="hf:REPO_ID: read the rows one at a time (nothing "
                   "downloaded up front; images go to a temporary folder as they come) instead of downloading it")


def _hf(a) -> dict:
    """Keyword arguments of ``load_data`` for a Hugging Face dataset (a progress bar of the rows read)."""
    if not a.data.startswith("hf:"):
        return {}
    return {"streaming": a.hf_streaming, "progress": _progress_bar()}


def feature_cache(a):
    """The feature cache of the command line (under ``$UADLAB_CACHE``, in the chosen dtype)."""
    import torch

    from .features import FeatureCache
    from .pipeline import default_cache_dir

    return FeatureCache(default_cache_dir(), dtype=getattr(torch, a.cache_dtype))


def run_config(a, methods: list[str]):
    """The run settings from the command line: parsed here, checked and resolved once by ``RunConfig.resolve``
    (a preset brings each method's paper backbone and geometry where the user did not choose them)."""
    from .pipeline import RunConfig

    given = {k: v for k, v in dict(weights=a.weights, seed=a.seed, window=a.window).items() if v is not None}
    cfg = RunConfig.resolve(methods, a.preset, a.backbone, a.image_size, a.resize,
                            method_kwargs=parse_params(a.param), **given)
    if a.preset == "paper":
        print("paper inputs: " + "; ".join(cfg.describe_inputs().splitlines()), file=sys.stderr)
    return cfg


def parse_params(items: list[str]) -> dict[str, dict]:
    """``["dinomaly.dropout=0", "dinomaly.attention=softmax"]`` -> ``{"dinomaly": {"dropout": 0, ...}}``.

    VALUE is JSON, else a string. Methods and value types are checked against the method's signature.
    """
    from .methods import get_method_class

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (eq and dot and method and name):
            raise ValueError(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. dinomaly.dropout=0")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        hint = typing.get_type_hints(get_method_class(method).__init__).get(name)  # unknown names: Run says
        if hint is not None and not _fits(value, hint):
            raise ValueError(f"--param {item!r}: {method}.{name} takes {_type_name(hint)}, got {value!r}")
        out.setdefault(method, {})[name] = value
    return out


def _fits(value, hint) -> bool:
    """Whether a JSON value suits a type hint of a method's ``__init__`` (ints count as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class ProgressBar:
    """A one-line progress bar on stderr: the whole job's share, the stage, its counts and ETA."""

    open_line = False  # a bar's line is drawn but not ended: a message must start on the next line

    def __init__(self, stream=None, width: int = 24) -> None:
        # the stderr of now, not of import time (a test's captured stream may be closed since)
        self.stream, self.width, self.stage = stream or sys.stderr, width, None

    def __call__(self, p: Progress) -> None:
        if self.stage is not None and p.stage.split(":")[0] != self.stage:
            self.stream.write("\n")  # a finished stage keeps its last line
        self.stage = p.stage.split(":")[0]
        frac = p.overall if p.overall is not None else p.fraction
        bar = "#" * round(frac * self.width)
        self.stream.write(f"\r[{bar:{self.width}s}] {frac * 100:5.1f}% {p.text[:90]:90s}")
        if frac >= 1:
            self.stream.write("\n")
        ProgressBar.open_line = frac < 1
        self.stream.flush()


def _progress_bar():
    """The progress bar of rank 0 (other ranks under torchrun stay quiet)."""
    return ProgressBar() if distributed.is_main() else None


def cmd_fit(a) -> int:
    from .data import load_data
    from .pipeline import Run, auxiliary_set

    run = Run(run_config(a, a.methods.split(",")), workdir=a.out, cache=feature_cache(a))
    ds = load_data(a.data, categories=a.categories.split(",") if a.categories else None, skip_bad=a.skip_bad,
                   **_hf(a))
    aux = None
    if any(h.zero_shot for h in run.heads.values()):  # other categories only, never the target's test images
        aux = auxiliary_set(load_data(a.data, skip_bad=a.skip_bad, **_hf(a)) if a.categories else ds, ds.categories)
    run.fit(ds.train[: a.train_limit] if a.train_limit else ds.train, _progress_bar(), aux=aux)
    if distributed.is_main():  # under torchrun every rank holds the same heads: rank 0 writes the run
        path = run.save({"dataset": ds.summary(), "world_size": distributed.world_size()})
        print(f"saved run {run.run_id} to {path}")
    return 0


def cmd_score(a) -> int:
    from .data import load_data, load_files
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
    ds = load_data(a.data, categories=a.categories.split(",") if a.categories else None, **_hf(a))
    res = run.evaluate(ds.test)
    rows = [{"method": m, "category": ",".join(ds.categories), **{k: v for k, v in r.items() if k != "curves"},
             "backbone_ms": None, "peak_rss_mb": None} for m, r in res.items()]
    print(markdown(rows))
    return 0


def cmd_bench(a) -> int:
    from .bench import markdown, run_bench, write_json

    t0 = time.perf_counter()
    main_rank = distributed.is_main()  # under torchrun every rank runs the bench; rank 0 reports it
    rows = run_bench(a.data, run_config(a, a.methods.split(",")),
                     categories=a.categories.split(",") if a.categories else None, multi_class=a.multi_class,
                     train_limit=a.train_limit, cache=feature_cache(a), progress=_progress_bar, data_kwargs=_hf(a),
                     log=lambda m: print(m, file=sys.stderr) if main_rank else None, seeds=a.seeds)
    if main_rank:
        print(markdown(rows))
    if a.json and main_rank:
        write_json(rows, a.json, {"args": {k: v for k, v in vars(a).items() if k != "func"},
                                  "total_s": time.perf_counter() - t0, "world_size": distributed.world_size()})
    return 0


def cmd_app(a) -> int:
    settings.set_workspace_default(a.workspace)
    app_path = Path(__file__).resolve().parent.parent / "app.py"
    if not app_path.exists():
        print("app.py not found next to the uadlab package (install from a source checkout)", file=sys.stderr)
        return 2
    import runpy

    sys.argv = [str(app_path), "--port", str(a.port)] + (["--share"] if a.share else [])
    runpy.run_path(str(app_path), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="uadlab", description="Unsupervised anomaly detection on frozen features")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fit", help="train heads on normal images and save the run")
    _data_args(p)
    p.add_argument("--methods", default="patchcore,anomalydino")
    p.add_argument("--train-limit", type=_positive, default=None)
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
    _data_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="compare methods on one dataset, backbone and cache")
    _data_args(p, "demo | FOLDER (MVTec layout) | hf:REPO_ID")
    p.add_argument("--methods", default="patchcore,anomalydino")
    p.add_argument("--multi-class", action="store_true", help="one model for all categories")
    p.add_argument("--train-limit", type=_positive, default=None, metavar="N",
                   help="the first N normal training images of each category (also with --multi-class)")
    p.add_argument("--seeds", type=_positive, default=1, metavar="K", help="repeat with seeds SEED .. SEED+K-1 "
                   "(the split of the normals and every method's seed): each metric's mean and standard deviation")
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
    from .errors import UadlabError
    from .backbones import BackboneWeightsError

    a = build_parser().parse_args(argv)
    distributed.init()  # launched by torchrun with several processes: join their group
    try:
        with warnings.catch_warnings():  # skipped files and the like: one line each
            warnings.showwarning = lambda msg, *_a, **_k: print(f"uadlab: warning: {msg}", file=sys.stderr)
            return a.func(a)
    except (UadlabError, BackboneWeightsError, KeyError, ValueError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        error = f"{e.strerror}: {Path(e.filename).name}" if isinstance(e, OSError) and e.filename else message
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: still one line unless debugging
        if settings.debug():
            raise
        error = f"internal error ({type(e).__name__}: {e}); set UADLAB_DEBUG=1 for the traceback"
    if ProgressBar.open_line:  # the error on a line of its own, not after a bar that stopped half-way
        sys.stderr.write("\n")
        ProgressBar.open_line = False
    print(f"uadlab {a.cmd}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
