"""What the process-level tests share: the installed commands, a simulator process, a bot process and waiting.

Each test runs the real `tradelab sim` and `tradelab run` commands as child processes in sessions of
their own (so a test can signal a whole run) and talks to the simulator over HTTP on loopback.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from tradelab.sim.synthetic import synthetic_market

HEARTBEAT = re.compile(r"INFO\s+tradelab\.loops: (scan|monitor) cycle (\d+):")


def command(name: str) -> str:
    "The path of an installed command of this environment (`tradelab`)."
    return str(Path(sys.executable).with_name(name))


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    "`cond()`'s first true value within `timeout_s`, else an AssertionError naming `what`."
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def sim_json(url: str, body: dict | None = None) -> dict:
    "GET (or POST `body` to) one of the simulator's own endpoints."
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def market_start(seed: int, history_days: int = 2) -> int:
    "A start `history_days` into the synthetic market of `seed` (enough history for the fast timeframes)."
    return synthetic_market(1, 0.01, seed).span_ms[0] + history_days * 86_400_000


@contextmanager
def sim_process(symbols: int, seed: int, *extra: str, speed: float = 1, history_days: int | None = 2):
    """`tradelab sim --synthetic symbols` at `speed` (real time unless told), `history_days` into its market (None: where
    the simulator starts by itself); yields its URL; stopped with SIGTERM afterwards."""
    start = [] if history_days is None else ["--start", str(market_start(seed, history_days))]
    proc = subprocess.Popen([command("tradelab"), "sim", "--synthetic", str(symbols), "--seed", str(seed), "--days", "3",
                             *start, "--speed", str(speed), "--log-level", "WARNING", *extra],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = re.search(r"at (http://\S+) with", proc.stdout.readline()).group(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def bot_env(url: str, symbols: int, **over: str | None) -> dict:
    """The environment of a paper bot against the simulator at `url`: fast timeframes, short intervals, `over` on top
    (a setting `over` gives as None is left out, to its default)."""
    base = {"EXCHANGE__BASE_URL": url, "EXCHANGE__MAX_RETRIES": "2", "BOT__SCAN_INTERVAL_S": "2",
            "BOT__MONITOR_INTERVAL_S": "1", "DATA__TIMEFRAMES": '["15m", "5m", "1m"]',
            "DATA__LIMITS": '{"15m": 100, "5m": 100, "1m": 100}', "UNIVERSE__TOP_N": str(symbols),
            "STRATEGY__MIN_CONFIDENCE": "0.5", "TRADING__RISK_PER_TRADE": "0.0025", "POOL__WORKERS": "1"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    return env | {f"TRADELAB_{k}": v for k, v in (base | over).items() if v is not None}


def start_bot(env: dict, home: Path, log_file: Path) -> subprocess.Popen:
    "`tradelab run --home home` in a session of its own, its output in `log_file`."
    with open(log_file, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([command("tradelab"), "run", "--home", str(home), "--log-level", "INFO"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def heartbeats(log_file: Path, loop: str | None = None) -> int:
    "Cycles of `loop` (or of both loops) the bot has logged as finished."
    return sum(1 for m in HEARTBEAT.finditer(log_file.read_text()) if loop in (None, m.group(1)))


def kill_session(proc: subprocess.Popen) -> None:
    "SIGKILL whatever is left of `proc`'s session (after a failed check)."
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def sigterm_and_time(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[float, int]:
    "SIGTERM to `proc`: (seconds until it exited, its exit status)."
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=timeout_s)
    return time.monotonic() - t0, code
