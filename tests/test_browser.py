"""Both panels in a real JupyterLab and a real browser, as a user opens them, with comms over subshells on and off.

`tradelab lab` starts JupyterLab on the quickstart (loopback, a token), once with JupyterLab's default of sending widget
messages through kernel subshells (another thread of the kernel) and once with that off. Debian's chromium, driven by
Playwright with the system browser (nothing downloaded), runs every cell from the menu, moves the tuning panel's
confidence-floor slider (the backtest must be redrawn), then clicks the live panel's Start, watches its figures and
tables change, closes a position, looks at every tab and clicks Stop. A second client on the same kernel then reads what
a user cannot see: the bot stopped with no task of it left and its temporary home gone, and the clicks arrived on
another thread exactly when subshells were on. A JavaScript error, a traceback, a control that does nothing or a bot left
running fails the check. Screenshots go to `.ci/out/browser-subshells-{on,off}/` (or `$ARTIFACTS_DIR`).
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


SUBSHELLS = {"on": None, "off": "disabled"}
"JupyterLab's `commsOverSubshells` in each run: its default (one subshell per comm target), and off."


def _lab_settings(folder: Path, subshells: str | None) -> Path:
    "JupyterLab settings: no autosave (the checkout's notebooks stay as they are), no news pop-up, comms over subshells as asked."
    for plugin, values in (("@jupyterlab/docmanager-extension/plugin", {"autosave": False}),
                           ("@jupyterlab/apputils-extension/notification", {"fetchNews": "false"}),
                           ("@jupyterlab/apputils-extension/kernels-settings",
                            {} if subshells is None else {"commsOverSubshells": subshells})):
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return folder


@pytest.fixture(scope="module", params=list(SUBSHELLS))
def lab(request, tmp_path_factory):
    "`tradelab lab` on loopback with a token, comms over subshells on or off; its base URL and runtime folder."
    port, tmp = _free_port(), tmp_path_factory.mktemp(f"lab-subshells-{request.param}")
    log, runtime = tmp / "lab.log", tmp / "runtime"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | {
        "PLOTLY_RENDERER": "plotly_mimetype", "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTERLAB_SETTINGS_DIR": str(_lab_settings(tmp / "settings", SUBSHELLS[request.param]))}
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
        yield {"url": base, "runtime": runtime, "subshells": request.param}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_lab_serves_the_quickstart(lab):
    nb = _get(f"{lab['url']}/api/contents/quickstart.ipynb?token={TOKEN}")
    assert nb["type"] == "notebook" and nb["content"]["metadata"]["kernelspec"]["name"] == "python3"
    sources = ["".join(c["source"]) for c in nb["content"]["cells"]]
    assert any("TuningPanel.load" in s for s in sources) and any("BotPanel()" in s for s in sources)
    with pytest.raises(urllib.error.HTTPError):  # the token is required
        _get(f"{lab['url']}/api/contents/quickstart.ipynb")


def in_kernel(lab, code: str) -> dict:
    "Run `code` (which prints one JSON line) in the quickstart's kernel, on its main shell; what it printed."
    from jupyter_client import BlockingKernelClient

    session = next(s for s in _get(f"{lab['url']}/api/sessions?token={TOKEN}") if s["path"].endswith("quickstart.ipynb"))
    client = BlockingKernelClient(connection_file=str(lab["runtime"] / f"kernel-{session['kernel']['id']}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        said: list[str] = []
        reply = client.execute_interactive(code, timeout=60, output_hook=lambda m: said.append(m["content"].get("text", ""))
                                           if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
    return json.loads("".join(said).strip().splitlines()[-1])


def run_all(page, lab) -> None:
    "Open the quickstart and run every cell from the menu, as a user does (again if the first click found the kernel not ready)."
    page.goto(f"{lab['url']}/lab/tree/quickstart.ipynb?token={TOKEN}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=60_000)
    started = "() => Array.from(document.querySelectorAll('.jp-InputPrompt')).some(p => /\\[(\\*|\\d+)\\]/.test(p.innerText))"
    for attempt in range(4):
        page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=60_000)  # the kernel is connected
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(started, timeout=15_000)
            return
        except Exception:
            page.keyboard.press("Escape")  # a menu left open
    raise AssertionError("Run All Cells did not start the notebook")


def move_the_tuning_slider(page, shots: Path) -> tuple[list, list, str]:
    "The tuning panel's confidence floor moved five steps; the plots before and after, and the status before."
    cell = page.locator(".jp-CodeCell", has_text="TuningPanel.load").first
    cell.locator(".widget-slider").first.wait_for(timeout=180_000)
    cell.scroll_into_view_if_needed()
    status = cell.locator(".widget-html", has_text="cycles:").first
    status.wait_for(timeout=60_000)
    page.wait_for_function("c => c.querySelectorAll('.js-plotly-plot').length >= 2", arg=cell.element_handle(), timeout=60_000)
    before, said = cell.element_handle().evaluate(PLOTS), status.inner_text()
    page.screenshot(path=str(shots / "tuning-panel-before.png"))
    floor = cell.locator(".widget-slider", has_text="confidence floor").first
    floor.locator(".noUi-handle").first.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")  # a user's move: the value is sent when the handle is let go
    page.wait_for_function("([el, old]) => el.innerText !== old", arg=[status.element_handle(), said], timeout=60_000)
    page.screenshot(path=str(shots / "tuning-panel-after.png"))
    return before, cell.element_handle().evaluate(PLOTS), said


def points(cell, name: str) -> int:
    "How many points the trace `name` of the cell's figures has."
    return dict((n, k) for n, k in cell.element_handle().evaluate(COUNTS)).get(name, 0)


def drive_the_live_panel(page, shots: Path, run_s: float) -> dict:
    "Start the live panel, close a position, let it run `run_s` seconds, screenshot each tab, stop; what was seen."
    cell = page.locator(".jp-CodeCell", has_text="BotPanel()").first
    start = cell.locator("button", has_text="Start").first
    start.wait_for(timeout=120_000)
    cell.scroll_into_view_if_needed()
    start.click()
    status = cell.locator(".widget-html", has_text="UTC;").first
    status.wait_for(timeout=120_000)
    page.wait_for_function(f"c => ({COUNTS})(c).some(([n, k]) => n === 'real equity' && k >= 5)", arg=cell.element_handle(),
                           timeout=90_000)
    seen = {"equity_points": points(cell, "real equity")}
    tab = lambda name: cell.locator(".lm-TabBar-tab", has_text=name).first
    tab("Positions").click()  # close one while the first entries are open (a long run may end with the breaker halted)
    choice = cell.locator(".widget-dropdown", has_text="position").locator("select").first
    page.wait_for_function("s => s.options.length > 0", arg=choice.element_handle(), timeout=90_000)
    chosen = choice.evaluate("s => s.options[s.selectedIndex].text")
    cell.locator("button", has_text="Close position").first.click()
    page.wait_for_function("([s, t]) => !Array.from(s.options).some(o => o.text === t)", arg=[choice.element_handle(), chosen],
                           timeout=60_000)
    time.sleep(run_s)
    seen |= {"closed": chosen, "equity_points_later": points(cell, "real equity"), "bars": points(cell, "bars"),
             "summary": cell.locator(".tradelab-summary").first.inner_text()}
    cell.screenshot(path=str(shots / "live-positions.png"))
    for name in ("Overview", "Trades", "Timing", "Log"):
        tab(name).click()
        time.sleep(0.5)  # the tab's figures lay out
        cell.screenshot(path=str(shots / f"live-{name.lower()}.png"))
    seen["log"] = cell.locator(".tradelab-log").first.inner_text()
    cell.locator("button", has_text="Stop").first.click()
    cell.locator(".widget-html", has_text="STOPPED").first.wait_for(timeout=60_000)
    page.wait_for_function("b => !b.disabled", arg=start.element_handle(), timeout=30_000)
    seen |= {"status": status.inner_text() if status.count() else "", "tab_labels": cell.locator(".lm-TabBar-tab").all_inner_texts()}
    tab("Overview").click()
    cell.screenshot(path=str(shots / "live-stopped.png"))
    return seen


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)")
def test_both_panels_in_a_real_browser(lab):
    """Run All on the quickstart; move the tuning panel's slider; start the live panel, watch it, close a position, stop it.

    Fails on a JavaScript error, a traceback in an output, a control that does nothing, or a bot left running."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("ARTIFACTS_DIR", ROOT / ".ci" / "out")) / f"browser-subshells-{lab['subshells']}"
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            try:
                run_all(page, lab)
                before, after, said = move_the_tuning_slider(page, shots)
                seen = drive_the_live_panel(page, shots, run_s=60 if lab["subshells"] == "on" else 10)
            except Exception:
                page.screenshot(path=str(shots / "failed.png"), full_page=True)
                raise
            tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback").count()
        finally:
            browser.close()
    kernel = in_kernel(lab, KERNEL_STATE)
    (shots / "seen.json").write_text(json.dumps({"seen": seen, "kernel": kernel}, indent=1, default=str))
    assert "cycles" in said
    equity = dict(before)["real equity"], dict(after)["real equity"]
    assert equity[0] != equity[1], (before, after)  # the backtest was redrawn for the new floor
    assert seen["equity_points_later"] > seen["equity_points"] and seen["bars"] > 0, seen
    assert "equity" in seen["summary"] and "USDT" in seen["summary"] and "closed by command" in seen["log"], seen
    assert [t.strip() for t in seen["tab_labels"]][:5] == ["Overview", "Positions", "Trades", "Timing", "Log"], seen
    assert "failed" not in seen["status"] and "STOPPED" in seen["status"], seen
    # the bot stopped and nothing of it runs; clicks came through subshells only when they were on
    assert kernel["state"] == "STOPPED" and kernel["tasks"] == [] and kernel["home"] is None, kernel
    assert (kernel["handed_over"] > 0) == (lab["subshells"] == "on"), kernel
    assert tracebacks == 0
    assert not errors, errors[:5]


COUNTS = """cell => Array.from(cell.querySelectorAll('.js-plotly-plot'))
                     .flatMap(p => (p.data || []).map(t => [t.name, (t.x || []).length]))"""
KERNEL_STATE = """import asyncio, json
print(json.dumps({"state": live.control.state.name, "handed_over": live.kernel.handed_over, "home": live.target.home,
                  "tasks": sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("tradelab") and not t.done())},
                 default=str))"""
