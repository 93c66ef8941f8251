"""A bot process killed with SIGKILL in the middle of a cycle, restarted on the same home, loses and duplicates nothing.

Two real processes talk HTTP over loopback: `tradelab sim` (a synthetic market at real-time speed, each
answer delayed so that cycles take a while) and `tradelab run` (the headless bot, paper mode, with short
intervals and positions that expire after a few seconds). The bot is killed, with its pool workers, while
a monitor request is in flight; the test compares the SQLite file before and after a restart.
"""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tradelab.exchange.client import TICKER_PRICE
from tradelab.sim.synthetic import synthetic_market

SEED, N_SYMBOLS, HISTORY_DAYS = 5, 30, 2
EXPIRY_S = 10


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = cond()
        if got: return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _get(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r: return json.loads(r.read())


@pytest.fixture(scope="module")
def sim():
    start = synthetic_market(1, 0.01, SEED).span_ms[0] + HISTORY_DAYS * 86_400_000
    proc = subprocess.Popen([_bin("tradelab"), "sim", "--synthetic", str(N_SYMBOLS), "--seed", str(SEED), "--days", "3",
                             "--start", str(start), "--speed", "1", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+) with", line).group(1)
        _get(f"{url}/_sim/faults", {"latency_ms": 250})      # every answer takes 250 ms: cycles are long
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _bot_env(url: str) -> dict:
    over = {"EXCHANGE__BASE_URL": url, "EXCHANGE__MAX_RETRIES": "2", "BOT__SCAN_INTERVAL_S": "2",
            "BOT__MONITOR_INTERVAL_S": "1", "DATA__TIMEFRAMES": '["15m", "5m", "1m"]',
            "DATA__LIMITS": '{"15m": 100, "5m": 100, "1m": 100}', "UNIVERSE__TOP_N": str(N_SYMBOLS),
            "STRATEGY__MIN_CONFIDENCE": "0.5", "TRADING__EXPIRY_S": str(EXPIRY_S), "TRADING__RISK_PER_TRADE": "0.0025",
            # one real position at a time, so the other signals are followed as virtual positions
            "TRADING__MAX_TRADES": "1", "TRADING__MAX_OPEN_POSITIONS": "1",
            # positions that expire after seconds mostly lose their fees: keep the breaker from pausing entries
            "RISK__LOSSES_REDUCE": "50", "RISK__LOSSES_PAUSE": "60", "RISK__LOSSES_HALT": "70"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    return env | {f"TRADELAB_{k}": v for k, v in over.items()}


def _start_bot(url: str, home: Path, log_name: str) -> subprocess.Popen:
    with open(home.parent / log_name, "w") as log:            # the child keeps its own descriptor
        return subprocess.Popen([_bin("tradelab"), "run", "--home", str(home), "--log-level", "INFO"], env=_bot_env(url),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _rows(db: Path) -> dict:
    "Every stored position (id -> its row) and every archive row, read from the file alone."
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pos = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, kind, state, exit_price, exit_reason, closed_ms, realized_pnl, opened_ms, mark_ms FROM positions")}
        archive = [r[0] for r in conn.execute("SELECT position_id FROM archive")]
    finally: conn.close()
    return {"positions": pos, "archive": archive}


def _state(rows: dict, state: str) -> dict:
    return {k: v for k, v in rows["positions"].items() if v[1] == state}


def _in_flight(url: str) -> int:
    "Price requests the simulator has received but not answered."
    ep = _get(f"{url}/_sim/stats")["endpoints"].get(TICKER_PRICE, {})
    return ep.get("requests", 0) - sum(v for k, v in ep.items() if k.isdigit())


def test_sigkill_mid_cycle_then_restart_loses_and_duplicates_nothing(sim, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db = home / "tradelab.sqlite"
    bot = _start_bot(sim, home, "first.log")
    try:
        def ready():
            try: r = _rows(db)
            except sqlite3.OperationalError: return False     # not created or not migrated yet
            open_kinds = {v[0] for v in _state(r, "OPEN").values()}
            return open_kinds == {"REAL", "VIRTUAL"} and _state(r, "CLOSED") and _in_flight(sim) > 0
        _wait(ready, 90, "open real and virtual positions, closed ones, and a monitor request in flight", poll_s=0.01)
        os.killpg(bot.pid, signal.SIGKILL)                   # the bot and its pool workers, mid-request
        killed_ms = _get(f"{sim}/_sim/clock")["now_ms"]      # exchange time of the kill
        bot.wait(timeout=10)
    finally:
        if bot.poll() is None: os.killpg(bot.pid, signal.SIGKILL)
    assert bot.returncode == -signal.SIGKILL
    before = _rows(db)
    open_before, closed_before = _state(before, "OPEN"), _state(before, "CLOSED")
    assert open_before and closed_before

    bot = _start_bot(sim, home, "second.log")
    try:
        def monitored_again():
            r = _rows(db)
            return all(r["positions"][k][1] == "CLOSED" for k in open_before)
        _wait(monitored_again, EXPIRY_S + 60, "every position open at the kill to be closed by the new process")
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=60) == 0                     # an orderly stop this time
    finally:
        if bot.poll() is None: os.killpg(bot.pid, signal.SIGKILL)
    after = _rows(db)

    for k, row in closed_before.items():                     # nothing closed is lost or changed
        assert after["positions"][k] == row
    for k in open_before:                                    # restored, then monitored and closed after the restart
        kind, state, exit_price, reason, closed_ms, pnl, opened_ms, _ = after["positions"][k]
        assert state == "CLOSED" and exit_price > 0 and closed_ms > killed_ms
        assert before["positions"][k][6] == opened_ms
    closed_after = _state(after, "CLOSED")
    assert len(after["archive"]) == len(set(after["archive"]))                     # nothing archived twice
    assert sorted(after["archive"]) == sorted(k for k, v in closed_after.items() if v[3] != "CANCELLED")
