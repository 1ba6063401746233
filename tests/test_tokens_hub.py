"""Whose token the app sends to the Hub: the visitor's or none, the server's only for the listed backbones.

The app runs in a subprocess whose ``HF_ENDPOINT`` points at a fake Hub on 127.0.0.1 (``tests/fakehub.py``)
and whose ``HF_TOKEN`` is the "operator's"; huggingface_hub reads the endpoint at import, so the process is
started with it, as a Space would be. The fake Hub records the ``Authorization`` header of every request;
each route of the app (dataset load, head push, head load, backbone fetch) is called through its callback,
once with an empty token field and once with the visitor's token.
"""
from __future__ import annotations

import io
import re
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fakehub import FakeHub, Repo  # noqa: E402

SERVER = "hf_SERVERoperator0123456789abc"  # HF_TOKEN of the server: the operator's
VISITOR = "hf_VISITORtyped0123456789xyz"  # what a visitor types in a token field
WHO = {None: "none", f"Bearer {SERVER}": "server", f"Bearer {VISITOR}": "visitor"}
ROOT = Path(__file__).resolve().parents[1]

# Each step: GET /__step__/<name> on the fake Hub (so that its requests can be told apart), then one callback.
SCRIPT = textwrap.dedent("""
    import json, os, sys, urllib.request
    from uadlab.ui import data_tab, hub_tab, train_tab
    from uadlab.workspace import DataChoice, Workspace, new_user_id

    out = {}
    def step(name, fn):
        urllib.request.urlopen(os.environ["HF_ENDPOINT"] + "/__step__/" + name).read()
        try:
            r = fn()
            out[name] = "ok: " + (r if isinstance(r, str) else r[1] if isinstance(r, tuple) and isinstance(r[1], str)
                                  else "done")
        except Exception as e:
            out[name] = "error: " + str(getattr(e, "message", e))

    user = new_user_id()
    ws = Workspace(user)
    ws.data.set(DataChoice("demo", category="brick"))
    run_id, _ = ws.runs.train(["patchcore"], None, "quick", 32)
    for who, token in (("empty", ""), ("visitor", os.environ["VISITOR"])):
        hf = lambda repo, stream: data_tab.HfSource(repo, streaming=stream, limit=4)
        step(f"dataset_public/{who}", lambda: data_tab.on_load_hf(user, "all", hf("acme/public-ds", False), token))
        step(f"dataset_operator/{who}", lambda: data_tab.on_load_hf(user, "all", hf("acme/private-ds", True), token))
        step(f"dataset_own/{who}", lambda: data_tab.on_load_hf(user, "all", hf("visitor/private-ds", True), token))
        step(f"push_operator/{who}", lambda: hub_tab.on_push(user, run_id, "patchcore", "acme/head", token, True))
        step(f"push_own/{who}", lambda: hub_tab.on_push(user, run_id, "patchcore", "visitor/head", token, True))
        step(f"load_operator/{who}", lambda: hub_tab.on_hub_score("acme/private-head", token, "auto", None))
        step(f"load_own/{who}", lambda: hub_tab.on_hub_score("visitor/head", token, "auto", None))
        ws.data.set(DataChoice("demo", category="brick"))
        for bb in ("dinov3_vits16", "vit_tiny_patch16_224.augreg_in21k"):
            step(f"backbone_{'listed' if bb.startswith('dino') else 'unlisted'}/{who}",
                 lambda: train_tab.on_train(user, bb, ["patchcore"], "quick", 32, "other categories", token))
    print("RESULT" + json.dumps(out))
""")


def _parquet(n_good: int, n_bad: int) -> bytes:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n_good + n_bad)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["good", "defect"])})
    buf = io.BytesIO()
    datasets.Dataset.from_dict({"image": images, "label": [0] * n_good + [1] * n_bad}, features=feats).to_parquet(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """(results per step, the tokens the fake Hub received per step, the fake Hub)."""
    tmp = tmp_path_factory.mktemp("fakehub")
    files = {"data/train-00000-of-00001.parquet": _parquet(4, 0), "data/test-00000-of-00001.parquet": _parquet(2, 2)}
    with FakeHub() as hub:
        hub.add("dataset", "acme/public-ds", files)
        hub.add("dataset", "acme/private-ds", files, token=SERVER)  # the operator's private data
        hub.add("dataset", "visitor/private-ds", files, token=VISITOR)
        hub.owners.update(acme=SERVER, visitor=VISITOR)  # who may create repositories where
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": SERVER, "VISITOR": VISITOR, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp / "hf"), "UADLAB_WORKSPACE": str(tmp / "ws"), "UADLAB_CACHE": str(tmp / "cache"),
               "UADLAB_DEMO": json.dumps({"n_train": 6, "n_test_good": 2, "n_test_per_defect": 1, "size": 48}),
               "UADLAB_EXAMPLE": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("HF_DATASETS_OFFLINE", None)
        # the operator's private head: a copy of what the visitor will push, readable with the server's token
        own = hub.add("model", "visitor/head", {}, token=VISITOR, write_token=VISITOR)
        hub.repos[("model", "acme/private-head")] = Repo(own.files, token=SERVER)
        p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0 and "RESULT" in p.stdout, p.stderr[-3000:]
        results = json.loads(p.stdout.split("RESULT", 1)[1])
        sent: dict[str, list[str]] = {}
        step = None
        for r in hub.requests:
            if r.path.startswith("/__step__/"):
                step = r.path[len("/__step__/"):]
                sent[step] = []
            elif step is not None and "agent-harnesses" not in r.path:  # huggingface_hub's own telemetry probe
                sent[step].append(WHO.get(r.authorization, "OTHER"))
        yield results, {k: sorted(set(v)) for k, v in sent.items()}, hub, (p.stdout + p.stderr)


def test_an_empty_token_field_sends_no_token(routes):
    """With the server's HF_TOKEN set and the field empty, data and heads go without a token: public data loads,
    the operator's private data and head stay unreadable, and nothing is pushed (refused before any request)."""
    results, sent, hub, _ = routes
    assert sent["dataset_public/empty"] == ["none"] and results["dataset_public/empty"].startswith("ok")
    for step in ("dataset_operator/empty", "dataset_own/empty", "load_operator/empty", "load_own/empty"):
        assert sent[step] == ["none"], (step, sent[step])
        assert "not found on the Hub, or private" in results[step], results[step]
    for step in ("push_operator/empty", "push_own/empty"):
        assert sent[step] == [] and "paste a WRITE token" in results[step], (step, sent[step], results[step])
    assert ("model", "acme/head") not in hub.repos  # the visitor did not push into the operator's organisation


def test_a_visitor_token_is_the_only_token_sent(routes):
    """With a token typed, every data and head request carries it, and only it."""
    results, sent, hub, _ = routes
    for step in ("dataset_public", "dataset_operator", "dataset_own", "push_operator", "push_own", "load_operator",
                 "load_own"):
        assert sent[f"{step}/visitor"] == ["visitor"], (step, sent[f"{step}/visitor"])
    assert results["dataset_own/visitor"].startswith("ok") and results["dataset_public/visitor"].startswith("ok")
    assert "not found on the Hub, or private" in results["dataset_operator/visitor"]
    assert "refused the credentials (HTTP 403)" in results["push_operator/visitor"]
    assert results["push_own/visitor"].startswith("ok: Pushed **patchcore**")
    assert "model.safetensors" in hub.repos[("model", "visitor/head")].files
    assert results["load_own/visitor"].startswith("ok: Loaded **patchcore**"), results["load_own/visitor"]
    assert "not found on the Hub, or private" in results["load_operator/visitor"]


def test_the_server_token_fetches_only_listed_backbones(routes):
    """An empty field: the listed (gated) DINOv3 is fetched with the server's token, another timm model with
    none; a typed token is used for both."""
    results, sent, _, _ = routes
    assert sent["backbone_listed/empty"] == ["server"]
    assert sent["backbone_unlisted/empty"] == ["none"]
    assert sent["backbone_listed/visitor"] == sent["backbone_unlisted/visitor"] == ["visitor"]
    assert "cannot download the weights of timm/vit_small_patch16_dinov3" in results["backbone_listed/empty"]


def test_no_message_or_log_shows_a_token(routes):
    results, _, _, output = routes
    for text in [*results.values(), output]:
        assert SERVER not in text and VISITOR not in text


# ---- in-process: the rules themselves ----------------------------------------------------------------------------
def test_token_rules(monkeypatch):
    from uadlab import tokens

    monkeypatch.setenv("HF_TOKEN", SERVER)
    assert tokens.visitor("") is False and tokens.visitor(f"  {VISITOR} ") == VISITOR
    assert tokens.for_request(None) is False and tokens.for_request(False) is False
    assert tokens.for_request(True) == SERVER  # the CLI / a notebook: this machine's own login
    assert tokens.for_backbone("timm/listed", None, {"timm/listed"}) == SERVER
    assert tokens.for_backbone("timm/other", False, {"timm/listed"}) is False
    assert tokens.for_backbone("timm/other", VISITOR, {"timm/listed"}) == VISITOR
    assert tokens.scrub(f"auth {SERVER} and {VISITOR}!", VISITOR) == "auth *** and ***!"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", "/nonexistent-uadlab-test")
    assert tokens.for_request(True) is False  # no login: none, not an error


def test_callback_errors_scrub_the_server_token(app, monkeypatch):
    """A failure whose text holds the server's token (as an echoed header would) shows *** instead."""
    import gradio as gr

    monkeypatch.setenv("HF_TOKEN", SERVER)

    @app.hub.ui_errors
    def fails(token: str | None):
        raise RuntimeError(f"upstream said: bad header Bearer {SERVER} / {token}")

    with pytest.raises(gr.Error) as e:
        fails(VISITOR)
    assert SERVER not in e.value.message and VISITOR not in e.value.message and "Bearer ***" in e.value.message


@pytest.mark.parametrize("name", ["local-dir:{dir}", "hf-hub:someone/model", "{dir}", "../x", "not_a_model"])
def test_app_refuses_backbones_it_does_not_list(app, tmp_path, name):
    """A custom backbone name cannot make the server read a folder (``local-dir:DIR`` reads DIR/config.json)."""
    import gradio as gr

    from uadlab.backbones import public_backbone

    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "secret_key_q7": 1}))
    user = app.header.on_start(None)[1]
    with pytest.raises(gr.Error, match="not a backbone this app offers") as e:
        app.train.on_train(user, name.format(dir=tmp_path), ["patchcore"], "quick", 32, "other categories", "")
    assert "secret_key_q7" not in e.value.message and str(tmp_path) not in e.value.message
    assert public_backbone("dinov2_vits14") == "dinov2_vits14" and public_backbone("") is None
    assert public_backbone("vit_small_patch16_224.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"


# ---- the served app: gradio's own texts, monitoring ------------------------------------------------------------
def _http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"} if body is not None else {})
    r = conn.getresponse()
    out = r.status, r.read().decode("utf-8", "replace")
    conn.close()
    return out


@pytest.fixture(scope="module")
def served(app):
    import socket

    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_EXAMPLE", "0")
    mp.delenv("UADLAB_MONITORING", raising=False)
    mp.setenv("HF_TOKEN", SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.serve("127.0.0.1", port, prevent_thread_lock=True)
    yield port
    demo.close()
    mp.undo()


def test_monitoring_is_off_unless_the_operator_turns_it_on(app, served, monkeypatch):
    status, text = _http(served, "GET", "/monitoring/summary")
    assert status == 403 and "not enabled" in text
    assert app.S.launch_guard()["enable_monitoring"] is False
    monkeypatch.setenv("UADLAB_MONITORING", "1")
    assert app.S.launch_guard()["enable_monitoring"] is True


def test_gradio_errors_show_no_server_path(app, served):
    """A client that sends a file path of the server (here inside the workspace, a blocked path) gets gradio's
    refusal through the app's filter: no blocked path, no working directory, no workspace."""
    status, text = _http(served, "GET", "/config")
    config = json.loads(text)
    files = {c["id"] for c in config["components"] if c.get("type") == "file"}
    dep = next(d for d in config["dependencies"] if files & set(d.get("inputs", [])))
    probe = str(app.W.workspace_root() / "users" / "probe.png")
    data = [[{"path": probe, "meta": {"_type": "gradio.FileData"}}] if i in files else None for i in dep["inputs"]]
    status, text = _http(served, "POST", "/gradio_api/queue/join",
                         {"data": data, "fn_index": dep["id"], "session_hash": "tokensprobe01", "trigger_id": None,
                          "event_data": None})
    assert status == 200, text
    status, text = _http(served, "GET", "/gradio_api/queue/data?session_hash=tokensprobe01")
    done = [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and '"process_completed"' in line]
    assert done and done[0]["success"] is False
    message = done[0]["output"]["error"]
    assert "Cannot move" in message and "blocked_paths" in message  # gradio's text, filtered
    for server_path in (str(app.W.workspace_root()), os.getcwd(), *app.S.launch_guard()["blocked_paths"]):
        assert server_path not in message, message
    status, text = _http(served, "GET", "/gradio_api/file=" + probe)  # an HTTP error answer, filtered whole
    assert status == 403 and str(app.W.workspace_root()) not in text


def test_a_loaded_head_cannot_name_a_server_folder_as_its_backbone(app, tmp_path, monkeypatch):
    """A head's config.json is the author's: ``backbone: local-dir:DIR`` is refused before anything reads DIR."""
    import gradio as gr

    from uadlab.methods import create_method

    target = tmp_path / "secret"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"architecture": "resnet18", "secret_key_q7": 1}))
    head = create_method("anomalydino", backbone=f"local-dir:{target}")
    head.save_pretrained(tmp_path / "head")
    (tmp_path / "head" / "uadlab_info.json").write_text(json.dumps({"method": "anomalydino"}))
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(tmp_path))
    img = tmp_path / "probe.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    with pytest.raises(gr.Error, match="not a backbone this app offers") as e:
        app.hub.on_hub_score("head", "", "auto", [str(img)])
    assert "secret_key_q7" not in e.value.message and str(target) not in e.value.message


def _http_error(cls, status: int):
    import httpx

    return cls(f"HTTP {status} for Bearer {SERVER}", response=httpx.Response(status, request=httpx.Request("GET", "http://h/x")))


@pytest.mark.parametrize("kind, expected", [
    ("gated", "the repository is gated; accept its terms"),
    ("missing", "not found on the Hub, or private"),
    ("refused", r"refused the credentials \(HTTP 401\)"),
    ("other_http", r"the Hub answered HTTP 500"),
    ("no_cache", "not reachable and it is not in the local cache; use the offline default"),
    ("connection", r"cannot reach the Hugging Face Hub \(ConnectionError\); use the offline default"),
    ("invalid", "is not a valid repository id"),
    ("offline", "not reachable here \\(offline mode"),
])
def test_one_translation_of_hub_failures(monkeypatch, kind, expected):
    """Every Hub failure of data, heads and backbones reads as one line naming the repository, without a token."""
    from huggingface_hub import errors as E

    from uadlab import tokens

    monkeypatch.setenv("HF_TOKEN", SERVER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if kind == "offline" else "0")
    e = {"gated": lambda: _http_error(E.GatedRepoError, 403), "missing": lambda: _http_error(E.RepositoryNotFoundError, 404),
         "refused": lambda: _http_error(E.HfHubHTTPError, 401), "other_http": lambda: _http_error(E.HfHubHTTPError, 500),
         "no_cache": lambda: E.LocalEntryNotFoundError("not cached"), "connection": lambda: ConnectionError(SERVER),
         "invalid": lambda: E.HFValidationError("bad id"), "offline": lambda: ConnectionError("down")}[kind]()
    msg = tokens.hub_message(e, "load", "owner/name", VISITOR, hint="use the offline default")
    assert re.search(expected, msg), msg
    assert "owner/name" in msg and SERVER not in msg and "\n" not in msg
