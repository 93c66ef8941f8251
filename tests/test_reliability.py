"""Failures found by trying the bot from outside, each reproduced here against real parts and kept fixed.

The breaker that forgot a loss, a start-up ended by one bad answer, a shutdown that outlived SIGTERM, a full
disk that hung the process, and a read-only home that said "unable to open database file". Process-level
checks run the installed `tradelab sim` and `tradelab run`; file-system faults use a small tmpfs this test
mounts (which needs root; without it those checks are skipped and say why).
"""
import asyncio
import logging
import re
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from processes import bot_env, command, heartbeats, kill_session, sigterm_and_time, sim_json, sim_process, start_bot, wait_for
from tradelab.bot import BotState, TradingBot
from tradelab.clock import TestClock
from tradelab.config import RiskSettings, load_settings
from tradelab.errors import ConfigError
from tradelab.sim.generators import random_positions
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market
from tradelab.storage.archive import DataArchiver
from tradelab.storage.store import BreakerRepository, Database, RefusalRepository
from tradelab.trading.positions import ExitReason, Kind
from tradelab.trading.risk import BreakerStore, CircuitBreaker, Level

SEED, SYMBOLS = 5, 20


def _settings(url: str, home: Path, **over):
    return load_settings(env={}, home=str(home), exchange={"base_url": url, "max_retries": 0}, pool={"workers": 0},
                         data={"timeframes": ["15m", "5m", "1m"], "limits": {"15m": 100, "5m": 100, "1m": 100}}, **over)


def _market_and_clock():
    market = synthetic_market(SYMBOLS, 3, seed=SEED)
    return market, TestClock(market.span_ms[0] + 2 * 86_400_000)


def test_a_loss_archived_just_before_a_kill_reaches_the_breaker_at_restart(tmp_path):
    "Three losses archived, the process killed before the breaker heard the third: the restart hears it."
    market, clock = _market_and_clock()
    with Database(tmp_path / "tradelab.sqlite") as db:
        losses = random_positions(3, ["BTCUSDT", "ETHUSDT", "SOLUSDT"], clock.now_ms() - 3_600_000, seed=3, kind=Kind.REAL)
        for i, p in enumerate(losses):
            p.close(p.stop, ExitReason.STOP, clock.now_ms() - 60_000 * (3 - i))
        assert all(p.realized_pnl < 0 for p in losses)
        breaker = CircuitBreaker(RiskSettings(), clock, 10_000.0, BreakerStore(BreakerRepository(db), RefusalRepository(db)))
        for p in losses[:2]:
            breaker.on_trade_closed(p.realized_pnl, 10_000.0)
        assert DataArchiver(db).archive_many(losses) == 3  # the third close is committed; the kill comes now

    async def restart():
        async with SimServer(market, clock) as sim:
            bot = await TradingBot(_settings(sim.url, tmp_path), clock=clock).initialize()
            try:
                b = bot.components.breaker
                return b.state.consecutive_losses, b.level, b.check_entry("BTCUSDT").size_factor
            finally:
                await bot.stop()

    assert asyncio.run(restart()) == (3, Level.REDUCED, 0.5)


def test_start_up_waits_out_an_exchange_that_fails_then_answers(tmp_path, caplog):
    "Every answer a 503, then garbage half the time: the start retries, says why, and completes."
    market, clock = _market_and_clock()

    async def start():
        async with SimServer(market, clock) as sim:
            sim.faults.update({"error_rate": 1.0})
            bot = TradingBot(_settings(sim.url, tmp_path), clock=clock)
            starting = asyncio.create_task(bot.initialize())
            while sim.stats()["requests"] < 2 and not starting.done():
                await asyncio.sleep(0.05)
            sim.faults.update({"error_rate": 0.0, "malformed_rate": 0.5, "seed": 11})
            await asyncio.wait_for(starting, 30)
            sim.faults.update({"malformed_rate": 0.0})
            state, contracts = bot.state, len(bot.components.contracts)
            await bot.stop()
            return state, contracts

    with caplog.at_level(logging.WARNING, logger="tradelab.bot"):
        state, contracts = asyncio.run(start())
    assert (state, contracts) == (BotState.READY, SYMBOLS)
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up: ")]
    assert retries and "GET /fapi/v1/time: HTTP 503" in retries[0]


def test_sigterm_ends_a_run_within_ten_seconds_while_a_ban_holds_its_requests(tmp_path):
    "A 418 holds every request for 120 s; SIGTERM still ends the run in order, well inside 10 s."
    with sim_process(SYMBOLS, SEED) as url:
        log_file = tmp_path / "bot.log"
        bot = start_bot(bot_env(url, SYMBOLS), tmp_path / "home", log_file)
        try:
            wait_for(lambda: heartbeats(log_file, "scan") >= 1, 90, "a first scan")
            sim_json(f"{url}/_sim/faults", {"force_status": 418})
            wait_for(lambda: "banned this IP" in log_file.read_text(), 10, "the ban to reach the bot")
            time.sleep(2.5)  # requests of both loops now wait for the ban to end
            took, code = sigterm_and_time(bot)
        finally:
            kill_session(bot)
    text = log_file.read_text()
    assert took < 10, f"the run took {took:.1f} s to exit after SIGTERM"
    assert code == 0 and "bot stopped" in text and "Traceback" not in text, text[-2000:]


@contextmanager
def _small_disk(path: Path, size: str):
    "A tmpfs of `size` mounted at `path` for the block (skips the test where mounting is not allowed)."
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> int:
    "Write zeros into `disk` until it is full; the bytes written."
    written, chunk = 0, b"\0" * 65536
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError:
            return written


def test_a_full_disk_stops_entries_keeps_monitoring_and_exits_on_sigterm(tmp_path):
    "The home's disk fills while the bot runs: entries stop (said once), cycles go on, SIGTERM ends it, the file is sound."
    with _small_disk(tmp_path / "disk", "24m") as disk, sim_process(30, SEED) as url:
        home, log_file = disk / "home", tmp_path / "bot.log"
        bot = start_bot(bot_env(url, 30, STRATEGY__MIN_CONFIDENCE="0.3"), home, log_file)
        try:  # positions first: with nothing to store, a full disk is no one's business
            wait_for(lambda: re.search(r"scan cycle .*; .* open [1-9]", log_file.read_text()), 90, "a first real position")
            _fill(disk)
            wait_for(lambda: "entries stopped: " in log_file.read_text(), 30, "the bot to notice the full disk")
            ticks = heartbeats(log_file, "scan")
            wait_for(lambda: heartbeats(log_file, "scan") >= ticks + 2, 30, "scans after the disk filled")
            assert bot.poll() is None
            took, code = sigterm_and_time(bot)
        finally:
            kill_session(bot)
        text = log_file.read_text()
        stopped = [line for line in text.splitlines() if "entries stopped: " in line]
        assert len(stopped) == 1 and "the disk is full" in stopped[0], stopped
        assert "entries held 1" in text  # the scans that went on took no entry
        assert took < 10 and code == 0, (took, code, text[-2000:])
        (disk / "filler").unlink()
        with sqlite3.connect(home / "tradelab.sqlite") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not list(home.glob("*.tmp")) and not list(home.glob(".*.tmp"))


def test_a_read_only_home_is_one_line_naming_permission(tmp_path):
    "A home on a read-only file system, with or without a database in it: one line, status 2, the word 'permission'."
    with _small_disk(tmp_path / "disk", "4m") as disk:
        (disk / "home").mkdir()
        Database(disk / "home" / "tradelab.sqlite").close()
        (disk / "empty").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(ConfigError, match=r"tradelab.sqlite: permission denied: the file .* is not writable"):
            Database(disk / "home" / "tradelab.sqlite")
        for home in (disk / "home", disk / "empty", disk / "empty" / "new"):
            out = subprocess.run([command("tradelab"), "run", "--home", str(home)], capture_output=True, text=True,
                                 timeout=60, env=bot_env("http://127.0.0.1:9", SYMBOLS))
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1, out.stderr
            assert "permission" in lines[0] and str(home) in lines[0], lines[0]
