"""Push trained heads to the Hugging Face Hub with a model card, load them back and score images.

A pushed repository holds what ``Method.save_pretrained`` writes (config.json, model.safetensors,
uadlab_info.json with the calibration, the method's name and the input geometry, README.md = model card)
plus ``example_heatmap.png``. Loading reads safetensors only. Each call sends the token it is given or none
(``True``: this machine's login; ``tokens.for_request``), never the server's by default: a public app passes
its visitor's. Tokens are used for one call, never stored or logged, scrubbed from error messages.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import tokens
from .errors import UadlabError
from .metrics import Evaluation
from .methods import Method, get_method_class

EXAMPLE_FILE = "example_heatmap.png"
INFO_FILE = "uadlab_info.json"


class HubError(UadlabError, RuntimeError):
    """A Hub operation failed; the message says why and what to do (it never contains the token)."""


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def prepare_head(run, method: str, folder: str | Path, example_image: Image.Image | None = None) -> Path:
    """Write one head of a run as a Hub-ready folder: weights, config, info, model card, example image."""
    if method not in run.heads:
        raise ValueError(f"the run has no {method!r} head (it has {', '.join(run.heads)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = run.heads[method]
    cfg = run.config
    evaluation = (getattr(run, "meta", {}).get("evaluation") or {}).get(method)
    # the metrics only: curve points are plotted, never listed (an Evaluation keeps them apart)
    metrics = Evaluation.from_dict(evaluation).finite() if evaluation is not None else \
        _finite_metrics(head.fit_record.metrics)
    inputs = cfg.inputs_of(method)  # the head's own backbone geometry (a paper preset may give each its own)
    rec = head.fit_record
    rec.method, rec.image_size, rec.resize, rec.weights = method, inputs.image_size, inputs.resize, cfg.weights
    rec.sigma, rec.score_mode, rec.metrics = cfg.sigma, cfg.score_mode, metrics
    if method in run.calibration:
        rec.calibration = run.calibration[method]
    if example_image is not None:
        example_image.convert("RGB").save(folder / EXAMPLE_FILE)
    (folder / "README.md").unlink(missing_ok=True)
    head.save_pretrained(folder, model_card_kwargs={"metrics": metrics,
                                                    "example_image": EXAMPLE_FILE if example_image else None,
                                                    "calibration": head.fit_record.calibration})
    return folder


def push_head(run, method: str, repo_id: str, token: tokens.Token = None, private: bool = False,
              example_image: Image.Image | None = None) -> str:
    """Create (or reuse) a model repository and upload one trained head with its model card.

    Args:
        run: a ``pipeline.Run`` (trained or loaded).
        method: which head of the run.
        repo_id: ``owner/name``.
        token: a write token; ``True``: this machine's login (``hf auth login``, ``HF_TOKEN``); none refuses.
        private: create the repository as private.
        example_image: an example heatmap for the model card.

    Returns:
        The repository URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    token = tokens.for_request(token)
    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise HubError(f"{repo_id!r} is not a valid repository id (expected owner/name): {e}") from None
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r}: give the full id owner/name")
    if token is False:
        raise HubError("no Hugging Face token: paste a WRITE token of the account or organisation that owns "
                       f"{repo_id.split('/')[0]} (it is used for this push only)")
    with tempfile.TemporaryDirectory(prefix="uadlab-push-") as tmp:
        prepare_head(run, method, tmp, example_image)
        api = HfApi()
        try:
            url = api.create_repo(repo_id, token=token, private=bool(private), exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=tmp, token=token, repo_type="model",
                              commit_message=f"uadlab: {method} head on {run.heads[method].backbone}")
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
            raise HubError(tokens.hub_message(e, "push to", repo_id, token)) from None
    return str(url)


def load_head(repo_or_dir: str, token: tokens.Token = None, method: str | None = None) -> Method:
    """Load a head from a Hub repository id or a local folder (safetensors only).

    The method is read from ``uadlab_info.json`` unless given. ``token``: for a private repository (``True``:
    this machine's login); none is sent otherwise.
    """
    from huggingface_hub import hf_hub_download

    src = (repo_or_dir or "").strip()
    token = tokens.for_request(token)
    if not src:
        raise HubError("enter a repository id (owner/name) or a folder")
    info: dict[str, Any] = {}
    where = Path(src).name if os.path.isdir(src) else src  # never a server path in a message
    try:
        if os.path.isdir(src):
            p = Path(src) / INFO_FILE
        else:
            try:  # next to model.safetensors in the snapshot: from_pretrained then reads it
                p = Path(hf_hub_download(src, INFO_FILE, token=token))
            except Exception as e:  # noqa: BLE001
                from huggingface_hub import errors as E

                if not isinstance(e, E.EntryNotFoundError) or isinstance(e, E.LocalEntryNotFoundError):
                    raise
                p = Path("/nonexistent")
        if p.exists():
            info = json.loads(p.read_text())
        name = method or info.get("method")
        if not name:
            raise HubError(f"{where}: cannot tell which method this head is; choose the method")
        return get_method_class(name).from_pretrained(src, token=token)
    except UadlabError:
        raise
    except KeyError as e:
        raise HubError(str(e).strip("'\"")) from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        if os.path.isdir(src):
            raise HubError(f"{where}: {type(e).__name__}: {e.strerror if isinstance(e, OSError) else e}") from None
        raise HubError(tokens.hub_message(e, "load", src, token)) from None


def score_images(head: Method, images: Sequence[Image.Image], token: tokens.Token = None
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Calibrated image scores (N,), heatmaps (N, S, S) and network views of images under a loaded head.

    The head scores through a one-head ``Run`` (``Run.from_head``): the same path as a head trained here.
    ``token`` may fetch gated backbone weights (``tokens.for_backbone``).
    """
    from .data import Sample
    from .pipeline import Run

    if not images:
        raise ValueError("upload at least one image")
    run = Run.from_head(head, token=token)
    samples = [Sample(f"image{i}", image=im.convert("RGB")) for i, im in enumerate(images)]
    scored = run.score(samples)[head.name]
    return scored.scores, scored.maps, [run.backbone.view(s.image) for s in samples]
