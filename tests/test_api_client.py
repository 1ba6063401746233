"""The README's gradio_client example against a real local server; only the four named endpoints are public."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    part = text[text.index("### Scripting it (gradio_client)"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


@pytest.fixture(scope="module")
def server(app):
    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_EXAMPLE", "0")  # no background example run: this test trains its own
    port = free_port()
    demo = app.serve("127.0.0.1", port, prevent_thread_lock=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()
    mp.undo()


def test_only_the_named_endpoints_are_public(server):
    from gradio_client import Client

    demo, url = server
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    assert sorted(info["named_endpoints"]) == ["/compare", "/evaluate", "/score", "/train"], info["named_endpoints"]
    assert not info["unnamed_endpoints"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/train"]["parameters"]]
    assert params == ["workspace", "data", "methods", "preset", "zip_file"]


def test_readme_client_example_runs(server, app, tmp_path, monkeypatch):
    from gradio_client import Client

    _, url = server
    code = readme_example()
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    from uadlab.demo import make_demo  # a brick image for "brick.png"

    demo = make_demo(tmp_path / "d", n_train=1, n_test_good=1, n_test_per_defect=1, size=96)
    Image.open(next((demo / "brick" / "test").rglob("*.png"))).save("brick.png")
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:7860/", url), scope)  # noqa: S102 - the README's own code
    printed = out.getvalue().splitlines()[-4:]  # after gradio_client's "Loaded as API: ..."
    print("\n".join(printed))
    values = {"nan": float("nan"), "None": None}
    headers, metrics, scores = (eval(line, values) for line in printed[:3])  # noqa: S307 - lists we printed
    heatmap = printed[3]
    assert headers[0] == "method" and "image AUROC" in " ".join(headers)
    assert metrics[0][0] == "patchcore" and 0 <= metrics[0][1] <= 1
    assert scores[0][0] == "brick.png" and scores[0][1] >= 0
    assert Image.open(heatmap).size[0] >= 96 and os.path.getsize(heatmap) > 1000

    # the other endpoints with the workspace and run the example got
    client, ws, run = Client(url, verbose=False), scope["workspace"], scope["run"]
    table, gallery = client.predict(ws, run, [], api_name="/compare")
    assert table["headers"] == ["image", "label", "patchcore"] and len(gallery) == len(table["data"]) >= 2
    assert {r[1] for r in table["data"]} == {"normal", "anomalous"}
    evaluated = client.predict(ws, run, "dataset", api_name="/evaluate")
    assert evaluated["data"] == metrics
    with pytest.raises(Exception, match="not in this workspace|choose a run"):
        client.predict(ws, "20990101-000000-abcdef", "dataset", api_name="/evaluate")
