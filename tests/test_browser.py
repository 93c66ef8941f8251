"""The notebooks in a real JupyterLab and a real browser, as a user opens them.

`tradelab lab` starts JupyterLab on the quickstart (loopback, a token); the server must hand the notebook out over
HTTP. Then Debian's chromium, driven by Playwright with the system browser (nothing downloaded), opens the quickstart,
runs every cell, and moves the tuning panel's confidence-floor slider: the backtest must be redrawn (another trade
count, another equity curve) with no JavaScript error on the page and no traceback in any output. Screenshots go to
`.ci/out/` (or `$TRADELAB_ARTIFACTS`).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from processes import command

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "tradelab-browser-check"
PLOTS = """cell => Array.from(cell.querySelectorAll('.js-plotly-plot'))
                     .flatMap(p => (p.data || []).map(t => [t.name, (t.y || []).length ? t.y[t.y.length - 1] : null]))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "`tradelab lab` on loopback with a token; its base URL."
    port, log = _free_port(), tmp_path_factory.mktemp("lab") / "lab.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | {"PLOTLY_RENDERER": "plotly_mimetype"}
    proc = subprocess.Popen([command("tradelab"), "lab", "--no-browser", "--port", str(port), "--token", TOKEN, "--",
                             "--ServerApp.ip=127.0.0.1", "--LabApp.news_url=None"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(f"{base}/api/status?token={TOKEN}")
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.25)
        else:
            raise AssertionError(f"JupyterLab did not answer in 60 s: {log.read_text()[-3000:]}")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_lab_serves_the_quickstart(lab):
    nb = _get(f"{lab}/api/contents/quickstart.ipynb?token={TOKEN}")
    assert nb["type"] == "notebook" and nb["content"]["metadata"]["kernelspec"]["name"] == "python3"
    sources = ["".join(c["source"]) for c in nb["content"]["cells"]]
    assert any("TuningPanel.load" in s for s in sources) and any("run_backtest" in s for s in sources)
    with pytest.raises(urllib.error.HTTPError):  # the token is required
        _get(f"{lab}/api/contents/quickstart.ipynb")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)")
def test_the_tuning_panel_redraws_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright

    out = Path(os.environ.get("TRADELAB_ARTIFACTS", ROOT / ".ci" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{lab}/lab/tree/quickstart.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=60_000)
            time.sleep(2)  # the kernel connects
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            cell = page.locator(".jp-CodeCell", has_text="TuningPanel.load").first
            cell.locator(".widget-slider").first.wait_for(timeout=180_000)
            cell.scroll_into_view_if_needed()
            status = cell.locator(".widget-html", has_text="cycles:").first
            status.wait_for(timeout=60_000)
            page.wait_for_function("c => c.querySelectorAll('.js-plotly-plot').length >= 2", arg=cell.element_handle(),
                                   timeout=60_000)
            before, said = cell.element_handle().evaluate(PLOTS), status.inner_text()
            page.screenshot(path=str(out / "tuning-panel-before.png"))

            floor = cell.locator(".widget-slider", has_text="confidence floor").first
            floor.locator(".noUi-handle").first.focus()
            for _ in range(5):
                page.keyboard.press("ArrowRight")  # a user's move: the value is sent when the handle is let go
            page.wait_for_function("([el, old]) => el.innerText !== old", arg=[status.element_handle(), said], timeout=60_000)
            after = cell.element_handle().evaluate(PLOTS)
            page.screenshot(path=str(out / "tuning-panel-after.png"))

            tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback").count()
        finally:
            browser.close()
    assert "cycles" in said
    equity = dict(before)["real equity"], dict(after)["real equity"]
    assert equity[0] != equity[1], (before, after)  # the backtest was redrawn for the new floor
    assert tracebacks == 0
    assert not errors, errors[:5]
