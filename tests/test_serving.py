"""The app on a real local Gradio server: no file of the workspace or the feature cache is reachable through any
route of gradio that reads files, exports reach the session that asked, and /config shows no server path."""
from __future__ import annotations

import http.client
import io
import json
import os
import socket
import zipfile
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from conftest import load_data

# every route of the installed gradio (6.x, routes.py) that answers with a file's bytes, by how it takes the path
PATH_ROUTES = ["/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/"]  # a path anywhere on the disk
DIR_ROUTES = ["/static/", "/assets/", "/svelte/", "/gradio_api/static/"]  # a path inside gradio's package folders
URL_ROUTES = ["/gradio_api/proxy="]  # a URL of a proxied Space


@pytest.fixture(scope="module")
def server(app):
    """The app launched like ``python app.py`` on a free port, after one session used everything it stores."""
    user = app.header.on_start(None)[0]
    src = app.W.workspace_root().parent / "src"
    src.mkdir(exist_ok=True)
    files = []
    for i in range(3):
        files.append(str(src / f"n{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(files[-1])
    load_data(app, user, "Upload", train_files=files, test_files=files[:1], mask_files=[], unmasked_normal=True)
    ws = app.W.Workspace(user)
    ws.annotations.save(0, "anomalous", np.ones((48, 48), np.uint8), "a note")
    run = ws.runs.dir / "20250101-000000-abcdef"  # what a saved run holds (a real run is trained elsewhere)
    (run / "patchcore").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": run.name, "created": 0, "config": {}}))
    (run / "patchcore" / "model.safetensors").write_bytes(os.urandom(64))
    cache = app.S.protected_paths()[1]  # the feature cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "features.safetensors").write_bytes(os.urandom(64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_MAX_UPLOAD_BYTES", "100000")  # gradio's max_file_size then refuses bigger uploads
    demo = app.serve("127.0.0.1", port, prevent_thread_lock=True)
    yield {"app": app, "user": user, "port": port, "url": f"http://127.0.0.1:{port}/", "cache": cache}
    demo.close()
    mp.undo()


def _post_file(port: int, name: str, content: bytes) -> tuple[int, bytes]:
    boundary = "uadlabprobe"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def _get(conn_box: list, path: str) -> tuple[int, bytes]:
    for _ in range(2):
        try:
            conn_box[0].request("GET", quote(path, safe="/=:%~@"))
            r = conn_box[0].getresponse()
            return r.status, r.read()
        except (http.client.HTTPException, OSError):
            conn_box[0].close()
            conn_box[0] = http.client.HTTPConnection(conn_box[0].host, conn_box[0].port, timeout=10)
    raise AssertionError(f"no answer for {path}")


def _probes(f: Path, root: Path, served_dir: Path) -> list[str]:
    """Every way to name ``f`` to each route: absolute, encoded, relative, and climbing out of a served folder."""
    a = str(f)
    climb = f"{served_dir}/{'../' * len(served_dir.parts)}{a.lstrip('/')}"
    names = [a, quote(a, safe=""), "/" + a, os.path.relpath(f), os.path.relpath(f, root), climb,
             climb.replace("..", "%2e%2e"), "file://" + a]
    dots = "../" * 12 + a.lstrip("/")
    return ([r + n for r in PATH_ROUTES for n in names]
            + [r + d for r in DIR_ROUTES for d in (dots, quote(dots, safe=""))]
            + [r + n for r in URL_ROUTES for n in ("file://" + a, a)])


def test_no_workspace_file_is_reachable(server):
    from gradio.utils import get_upload_folder

    app = server["app"]
    root = app.W.workspace_root()
    files = sorted(p for p in root.rglob("*") if p.is_file()) + sorted(server["cache"].rglob("*.safetensors"))
    names = {p.name for p in files}
    assert {".browser_secret", "uadlab.sqlite", "data.json", "run.json", "manifest.json", "n0.png"} <= names
    conn = [http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)]

    # positive control: a file gradio received IS served by the same route, so the refusals below mean something
    code, answer = _post_file(server["port"], "probe.txt", b"hello probe")
    assert code == 200
    assert _get(conn, "/gradio_api/file=" + json.loads(answer)[0]) == (200, b"hello probe")

    status: Counter = Counter()
    leaks = []
    for f in files:
        secret = f.read_bytes()
        for probe in _probes(f, root, Path(get_upload_folder())):
            code, data = _get(conn, probe)
            status[code] += 1
            if code < 400 or (secret and secret in data):
                leaks.append((probe, code))
    conn[0].close()
    n_routes = len(PATH_ROUTES + DIR_ROUTES + URL_ROUTES)
    print(f"\nserving probe: {len(files)} files x {n_routes} routes = {sum(status.values())} requests "
          f"(path variants: absolute, encoded, relative, '..'), statuses {dict(sorted(status.items()))}")
    assert not leaks, leaks[:5]
    assert all(400 <= c < 500 for c in status)


def test_config_and_api_info_show_no_server_path(server):
    root = server["app"].W.workspace_root()
    sensitive = [str(root), str(root.parent), str(server["cache"]), os.getcwd(), server["user"]]
    for route in ("/config", "/gradio_api/info"):
        conn = [http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)]
        code, data = _get(conn, route)
        assert code == 200 and len(data) > 1000
        text = data.decode()
        assert not [s for s in sensitive if s in text], route


def test_export_reaches_its_session_from_outside_the_workspace(server):
    """Over HTTP, as the page does: the session opens the workspace by id and exports; the zip arrives, served
    from gradio's cache (the workspace itself is blocked)."""
    import urllib.request

    from helpers import call_event

    session = "exportsession1"
    call_event(server["url"], "on_switch_workspace", [server["user"]], session)
    shown = call_event(server["url"], "export_annotations", [server["user"]], session)[0]
    data = urllib.request.urlopen(shown["value"]["url"] if "value" in shown else shown["url"], timeout=30).read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert any("/test/anomalous/" in n for n in zf.namelist())
    assert not (server["app"].W.workspace_root() / "users" / server["user"] / "exports").exists()


def test_uploads_past_the_limit_are_refused_by_the_server(server):
    assert _post_file(server["port"], "big.zip", os.urandom(150_000))[0] == 413
    assert _post_file(server["port"], "small.zip", os.urandom(50_000))[0] == 200
