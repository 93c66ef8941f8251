"""A bot process killed with SIGKILL in the middle of a cycle, restarted on the same home, loses and duplicates nothing.

Two real processes talk HTTP over loopback: `tradelab sim` (a synthetic market at real-time speed, each
answer delayed so that cycles take a while) and `tradelab run` (the headless bot, paper mode, with short
intervals and positions that expire after a few seconds). The bot is killed, with its pool workers, while
a monitor request is in flight; the test compares the SQLite file before and after a restart.
"""
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from processes import bot_env, kill_session, sim_json, sim_process, start_bot, wait_for
from tradelab.exchange.client import TICKER_PRICE

SEED, N_SYMBOLS = 5, 30
EXPIRY_S = 10


@pytest.fixture(scope="module")
def sim():
    with sim_process(N_SYMBOLS, SEED) as url:
        sim_json(f"{url}/_sim/faults", {"latency_ms": 250})  # every answer takes 250 ms: cycles are long
        yield url


def _bot_env(url: str) -> dict:
    "The shared paper bot's environment, with positions that expire after seconds and one real position at a time."
    return bot_env(url, N_SYMBOLS, TRADING__EXPIRY_S=str(EXPIRY_S), POOL__WORKERS=None,  # a pool of one per core
                   # one real position at a time, so the other signals are followed as virtual positions
                   TRADING__MAX_TRADES="1", TRADING__MAX_OPEN_POSITIONS="1",
                   # positions that expire after seconds mostly lose their fees: keep the breaker from pausing entries
                   RISK__LOSSES_REDUCE="50", RISK__LOSSES_PAUSE="60", RISK__LOSSES_HALT="70")


def _rows(db: Path) -> dict:
    "Every stored position (id -> its row) and every archive row, read from the file alone."
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pos = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, kind, state, exit_price, exit_reason, closed_ms, realized_pnl, opened_ms, mark_ms FROM positions")}
        archive = [r[0] for r in conn.execute("SELECT position_id FROM archive")]
    finally:
        conn.close()
    return {"positions": pos, "archive": archive}


def _state(rows: dict, state: str) -> dict:
    return {k: v for k, v in rows["positions"].items() if v[1] == state}


def _in_flight(url: str) -> int:
    "Price requests the simulator has received but not answered."
    ep = sim_json(f"{url}/_sim/stats")["endpoints"].get(TICKER_PRICE, {})
    return ep.get("requests", 0) - sum(v for k, v in ep.items() if k.isdigit())


def test_sigkill_mid_cycle_then_restart_loses_and_duplicates_nothing(sim, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db = home / "tradelab.sqlite"
    bot = start_bot(_bot_env(sim), home, tmp_path / "first.log")
    try:
        def ready():
            try:
                r = _rows(db)
            except sqlite3.OperationalError:  # not created or not migrated yet
                return False
            open_kinds = {v[0] for v in _state(r, "OPEN").values()}
            return open_kinds == {"REAL", "VIRTUAL"} and _state(r, "CLOSED") and _in_flight(sim) > 0
        wait_for(ready, 90, "open real and virtual positions, closed ones, and a monitor request in flight", poll_s=0.01)
        os.killpg(bot.pid, signal.SIGKILL)                   # the bot and its pool workers, mid-request
        killed_ms = sim_json(f"{sim}/_sim/clock")["now_ms"]  # exchange time of the kill
        bot.wait(timeout=10)
    finally:
        kill_session(bot)
    assert bot.returncode == -signal.SIGKILL
    before = _rows(db)
    open_before, closed_before = _state(before, "OPEN"), _state(before, "CLOSED")
    assert open_before and closed_before

    bot = start_bot(_bot_env(sim), home, tmp_path / "second.log")
    try:
        def monitored_again():
            r = _rows(db)
            return all(r["positions"][k][1] == "CLOSED" for k in open_before)
        wait_for(monitored_again, EXPIRY_S + 60, "every position open at the kill to be closed by the new process")
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=60) == 0                     # an orderly stop this time
    finally:
        kill_session(bot)
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
