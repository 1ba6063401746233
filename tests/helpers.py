"""Helpers shared by the tests: free ports, the app in a subprocess, Chromium and the browser-side waits.

Every wait here waits on a CONDITION (a selector, a value, a layout), never a fixed time: a slow machine
makes a test slower, not red.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    """Debian's Chromium (or any ``chromium`` on PATH; ``$UADLAB_CHROMIUM`` names another binary, or a missing
    one to see what a machine without Chromium does); None when it is not installed."""
    chosen = os.environ.get("UADLAB_CHROMIUM")
    if chosen:
        return chosen if Path(chosen).exists() else None
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def in_ci() -> bool:
    """CI runs (``CI=true``, as .ci/run and most CI systems set) REQUIRE the browser tests."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def start_app(tmp: Path, env_extra: dict[str, str] | None = None, timeout: float = 120.0):
    """``python app.py`` on a free port with its own workspace and caches: (process, url, seconds to answer,
    log path). Raises RuntimeError with the log's tail when it exits or does not answer."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UADLAB_WORKSPACE": str(tmp / "workspace"),
           "UADLAB_CACHE": str(tmp / "cache"), "GRADIO_ANALYTICS_ENABLED": "False", **(env_extra or {})}
    log_path = tmp / "app.log"
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, time.perf_counter() - t0, log_path, log
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the app did not answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)


def stop_app(proc: subprocess.Popen, log) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def wait_until(check: Callable[[], object], timeout: float = 30.0, every: float = 0.1, what: str = "a condition"):
    """Poll ``check()`` until it returns a truthy value (returned); AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(every)


# ---- pages ------------------------------------------------------------------------------------------------
def overflow(page) -> int:
    """How far the page scrolls sideways (0: nothing wider than the viewport)."""
    return page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")


def resize(page, width: int, height: int) -> None:
    """Set the viewport and wait until the page has laid out at the new width (two animation frames)."""
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_function(f"window.innerWidth === {width}")
    next_frame(page)


def next_frame(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def open_tab(page, name: str, shown: str) -> None:
    """Click a tab and wait until ``shown`` (a selector inside it) is visible."""
    page.get_by_role("tab", name=name).click()
    page.wait_for_selector(shown, state="visible")


# ---- the heatmap viewer in a browser page (its root has the id "viewer") ----------------------------------
def viewer_transforms(page) -> list[str]:
    return page.eval_on_selector_all("#viewer .uadv-panel", "els => els.map(e => e.dataset.transform)")


def viewer_shares(page) -> list[float]:
    return page.eval_on_selector_all("#viewer .uadv-share", "els => els.map(e => parseFloat(e.dataset.share))")


def wheel_zoom(page, stage, at: tuple[float, float] = (0.5, 0.5)) -> list[str]:
    """Wheel up over a panel's stage until the viewer zooms past 1.5x; return every panel's transform once
    they all agree (the zoom is applied to each panel in turn)."""
    stage.scroll_into_view_if_needed()
    box = stage.bounding_box()
    page.mouse.move(box["x"] + box["width"] * at[0], box["y"] + box["height"] * at[1])
    page.mouse.wheel(0, -400)
    page.wait_for_function("parseFloat(document.querySelector('#viewer').dataset.zoom) > 1.5")
    page.wait_for_function("""() => { const t = [...document.querySelectorAll('#viewer .uadv-panel')]
        .map(e => e.dataset.transform); return t.length && t.every(x => x === t[0]) &&
        parseFloat(t[0].split(' ')[0]) > 1.5; }""")
    return viewer_transforms(page)


# ---- the app's private events, called as its own page calls them ------------------------------------------
def call_event(url: str, api_name: str, data: list, session: str, timeout: float = 120.0) -> list:
    """Run one of the app's events as the browser page does (by its index in /config, on the queue of a session):
    the screens' events are private to API clients (``ui.api``), not to the page. Returns the output values."""
    import json
    import urllib.request

    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    body = json.dumps({"data": data, "fn_index": index, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    req = urllib.request.Request(url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    with urllib.request.urlopen(f"{url}gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for line in stream:
            if not line.startswith(b"data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                if not msg.get("success"):
                    raise RuntimeError(f"{api_name} failed: {msg.get('output')}")
                return msg["output"]["data"]
    raise RuntimeError(f"{api_name}: the stream ended without a result")
