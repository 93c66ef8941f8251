"""The weight governor and the client under the faults that froze or banned them, over real HTTP against the simulator.

- A bot (`tradelab run`, paper mode) against `tradelab sim` with a low weight limit and a clock in the past: the
  bot's clock moves back years when it synchronises, and its weight window must follow; it keeps cycling and never
  goes over the limit.
- A 418 while hundreds of requests wait in one client: nothing the client sends after it has the 418 reaches the
  exchange before the ban ends, so the ban does not climb the ladder.
- Malformed answers (cut in half) are retried like temporary failures, then reported as `MalformedResponse`.
"""

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from processes import bot_env, heartbeats, kill_session, sim_json, sim_process, start_bot
from tradelab.clock import SimClock
from tradelab.config import load_settings
from tradelab.errors import MalformedResponse
from tradelab.exchange.client import BinanceClient
from tradelab.sim.rules import Faults, WeightLimiter
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market

SEED, N_SYMBOLS = 5, 30
WEIGHT_LIMIT, SPEED, RUN_S = 300, 2.0, 75  # two and a half simulated minutes; the bot's share (0.8) is 240 weight


@pytest.fixture(scope="module")
def market():
    return synthetic_market(20, 3, seed=1)


def exchange(url: str, **kw):
    return load_settings(env={}, exchange={"base_url": url, **kw}).exchange


async def until(cond, what: str, real_s: float = 20.0) -> None:
    "Wait (real time, for HTTP to travel) until `cond()` holds."
    for _ in range(int(real_s / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# --- a bot against a low weight limit, the exchange's clock years behind ours --------------------------------------


def _bot_env(url: str) -> dict:
    "The shared paper bot's environment under the low weight limit; confidence, risk and pool at their defaults."
    return bot_env(url, N_SYMBOLS, EXCHANGE__WEIGHT_LIMIT=str(WEIGHT_LIMIT),
                   STRATEGY__MIN_CONFIDENCE=None, TRADING__RISK_PER_TRADE=None, POOL__WORKERS=None)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    "SIGTERM, `grace_s` to exit, then SIGKILL for whatever is left of its session."
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    kill_session(proc)


def _watch(bot: subprocess.Popen, log_path: Path, seconds: float) -> tuple[int, float, float]:
    "Read the bot's log every half second for `seconds`: heartbeats seen, the longest wait between two, the last wait."
    beats, longest, last_at = 0, 0.0, time.monotonic()
    end = last_at + seconds
    while (now := time.monotonic()) < end:
        assert bot.poll() is None, log_path.read_text()[-3000:]
        n = heartbeats(log_path)
        if n > beats:
            longest = max(longest, now - last_at) if beats else 0.0
            beats, last_at = n, now
        time.sleep(0.5)
    return beats, max(longest, end - last_at), end - last_at


def test_bot_keeps_cycling_under_a_low_weight_limit_when_its_clock_moves_back(tmp_path):
    # the simulator's own start, not one `history_days` into its market
    with sim_process(N_SYMBOLS, SEED, "--weight-limit", str(WEIGHT_LIMIT), speed=SPEED, history_days=None) as url:
        assert sim_json(f"{url}/_sim/clock")["now_ms"] < time.time() * 1000 - 86_400_000  # the exchange lives in the past
        log_path = tmp_path / "bot.log"
        bot = start_bot(_bot_env(url), tmp_path / "home", log_path)
        try:
            beats, longest, last = _watch(bot, log_path, RUN_S)
            log, stats = log_path.read_text(), sim_json(f"{url}/_sim/stats")
        finally:
            _stop(bot, 5)
    print(
        f"\nbot against a {WEIGHT_LIMIT}-weight limit: {beats} heartbeats over {RUN_S} s, longest wait for one "
        f"{longest:.1f} s, highest weight header {stats['max_used_weight_1m']}, {stats['requests']} requests, "
        f"429s {stats['status_429']}, 418s {stats['status_418']}"
    )
    assert last < 10, f"no heartbeat in the last {last:.0f} s:\n{log[-3000:]}"
    # the start-up spends the minute's budget: the cycles wait for the next minute, never longer
    assert beats >= 15 and longest < 66
    assert stats["status_429"] == stats["status_418"] == 0
    assert 0 < stats["max_used_weight_1m"] <= 0.8 * WEIGHT_LIMIT  # the header never went over the bot's share
    assert "Traceback" not in log


# --- a 418 while hundreds of requests wait ------------------------------------------------------------------------

GRACE_MS = WeightLimiter().grace_ms  # an arrival this soon after the ban was on its way before the client knew


def test_nothing_sent_after_a_418_reaches_the_exchange_before_the_ban_ends(market):
    """A simulated minute lasts one real second, so the 120 s ban lasts two; four connections and 30 ms of latency
    keep requests on the wire; 400 requests wait behind them when the 418 comes."""

    async def run():
        clock, symbols = SimClock(market.default_start_ms(), speed=60), list(market.symbols)
        settings = dict(max_connections=4, backoff_base_s=0.5)
        async with (
            SimServer(market, clock, faults=Faults(latency_ms=30)) as sim,
            BinanceClient(exchange(sim.url, **settings), clock) as client,
        ):
            tasks = [asyncio.ensure_future(client.get_klines(symbols[i % len(symbols)], "1m", limit=50)) for i in range(400)]
            try:
                await until(lambda: sim.stats()["requests"] >= 40, "the first requests")
                sim.faults.update({"force_status": 418})
                waiting = sum(not t.done() for t in tasks)
                await until(lambda: sim.stats()["status_418"] >= 1, "the 418")
                ban_start = next(t for t, _, status, _ in sim.requests.rows() if status == 418)
                await until(lambda: clock.now_ms() > ban_start + 125_000, "the end of the ban")
                during = [
                    (t - ban_start, status) for t, _, status, _ in sim.requests.rows(ban_start + 1) if t < ban_start + 120_000
                ]
                ladder = (sim.limiter.banned_until - ban_start, sim.limiter.next_ban_s)
                await asyncio.wait(tasks, timeout=30)
                answers = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
                return waiting, during, ladder, answers, sim.stats(), client.stats.governor
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    waiting, during, ladder, answers, srv, gov = asyncio.run(run())
    print(
        f"\n418 with {waiting} requests waiting: {len(during)} arrival(s) during the ban, at "
        f"{[ms for ms, _ in during][:12]} ms after it began; the ban lasted {ladder[0] / 1000:g} s"
    )
    assert waiting >= 300
    late = [(ms, status) for ms, status in during if ms >= GRACE_MS]
    assert not late, f"{len(late)} request(s) reached the exchange during the ban, sent after the 418: {late[:10]}"
    assert ladder == (120_000, 240)  # one ban, not a longer one
    # every request served, after the ban: 49 closed bars of 50, or 48 when a bar closed while the answer was on its way
    assert len(answers) == 400 and all(len(k) in (48, 49) for k in answers)
    assert srv["status_418"] == 1 + len(during) and gov.banned == srv["status_418"] and srv["status_429"] == 0


# --- malformed answers ----------------------------------------------------------------------------------------------


def test_malformed_answers_are_retried_then_reported(market):
    "On a clock 1000 times faster than real time, so that the backoff before each retry costs little."

    async def run():
        clock = SimClock(market.default_start_ms(), speed=1000)
        async with (
            SimServer(market, clock, faults=Faults(malformed_rate=0.2, seed=7)) as sim,
            BinanceClient(exchange(sim.url, max_retries=5), clock) as client,
        ):
            for _ in range(20):
                prices, now, info = await client.all_prices(), await client.server_time(), await client.exchange_info()
                assert len(prices) == len(market.symbols) and now > 0 and len(info.contracts()) == len(market.symbols)
            retried = client.stats.governor.retries
            sim.faults.update({"malformed_rate": 1.0})
            failures = []
            for call in (client.all_prices, client.server_time, client.exchange_info):
                before = sim.stats()["requests"]
                with pytest.raises(MalformedResponse) as e:
                    await call()
                failures.append((str(e.value), sim.stats()["requests"] - before))
            return retried, failures, client.stats.governor.retries - retried

    retried, failures, retries_after = asyncio.run(run())
    print(f"\n20% malformed: 60 calls served after {retried} retries; then {[(m[:40], n) for m, n in failures]}")
    assert retried > 0
    assert [sent for _, sent in failures] == [6, 6, 6] and retries_after == 15  # max_retries (5) each, then raised
    assert all("answer is not JSON" in msg for msg, _ in failures)
    assert [msg.split(":")[0] for msg, _ in failures] == [
        "GET /fapi/v2/ticker/price",
        "GET /fapi/v1/time",
        "GET /fapi/v1/exchangeInfo",
    ]
