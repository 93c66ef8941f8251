"""DataService over HTTP against the simulator: exchange gaps, damaged answers, errors, concurrency, restarts."""
import asyncio
import contextlib
import json
import logging
import sys

import numpy as np

from tradelab.exchange.client import BinanceClient
from tradelab.clock import TestClock
from tradelab.config import load_settings
from tradelab.data.service import DataService, Due
from tradelab.errors import UnknownSymbol
from tradelab.sim.source import MarketSource, Series
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market

DAY, HOUR, MIN = 86_400_000, 3_600_000, 60_000


@contextlib.asynccontextmanager
async def exchange(market: MarketSource, start_ms: int, home, **sections):
    "A simulator on a stepped clock, a client and a DataService (built from `sections`), all on that clock."
    clock = TestClock(start_ms)
    async with SimServer(market, clock) as sim:
        exchange_cfg = {"base_url": sim.url, "max_retries": 0} | sections.pop("exchange", {})
        settings = load_settings(env={}, home=home, exchange=exchange_cfg, **sections)
        async with BinanceClient(settings.exchange, clock) as client:
            yield sim, clock, settings, client, DataService(settings, client, clock)


def klines_count(sim) -> tuple[int, int]:
    "(klines requests, their weight) the simulator answered."
    s = sim.stats()["endpoints"].get("/fapi/v1/klines", {})
    return s.get("requests", 0), s.get("weight", 0)


def assert_true_to(market: MarketSource, svc: DataService) -> None:
    "Every series the service holds is contiguous and carries exactly the market's bars."
    for sym, tf in svc.series:
        v, _ = svc.read(sym, tf)
        ref = market.series(sym, tf)
        i = np.searchsorted(ref.open_time, v.open_time)
        assert (ref.open_time[i] == v.open_time).all(), (sym, tf)
        for c in ("open", "high", "low", "close"):
            np.testing.assert_array_equal(getattr(v, c), getattr(ref, c)[i], err_msg=f"{sym} {tf} {c}")
        np.testing.assert_allclose(v.volume, ref.volume[i], rtol=1e-12, err_msg=f"{sym} {tf} volume (printed decimals)")


class Records(logging.Handler):
    def __init__(self): super().__init__(); self.records = []
    def emit(self, record): self.records.append(record)


@contextlib.contextmanager
def records(name: str = "tradelab.data.service"):
    h, logger = Records(), logging.getLogger(name)
    logger.addHandler(h)
    try: yield h.records
    finally: logger.removeHandler(h)


# A bar missing on the exchange: the 5m bar of 00:20 is absent (its five 1m bars never traded).

def gapped_market(gap_open_ms: int) -> MarketSource:
    m = synthetic_market(2, days=7, seed=4)
    sym = "SYN000USDT"
    b = m.series(sym)
    keep = (b.open_time < gap_open_ms) | (b.open_time >= gap_open_ms + 5 * MIN)
    cut = Series("1m", b.open_time[keep], b.open[keep], b.high[keep], b.low[keep], b.close[keep], b.volume[keep])
    return MarketSource({sym: cut, "SYN001USDT": m.series("SYN001USDT")}, m.entries, "synthetic with a gap")


async def _missing_bar(home):
    t0 = synthetic_market(1, days=1).span_ms[0] + 5 * DAY
    gap = t0 + 20 * MIN
    market = gapped_market(gap)
    async with exchange(market, t0 + 2_000, home, data={"timeframes": ["5m"], "cache_file": ""}) as (sim, clock, _, _, svc):
        await svc.refresh(["SYN000USDT"])
        seen = []
        for minute in range(1, 36):
            clock.set_ms(t0 + minute * MIN + 2_000)
            r0 = klines_count(sim)[0]
            s = (await svc.refresh(["SYN000USDT"])).series[0]
            seen.append((minute, s.due, s.fresh, klines_count(sim)[0] - r0, s.checked_ms))
        return market, clock, svc, seen


def test_missing_bar_is_retried_every_cycle_then_accepted(tmp_path):
    market, clock, svc, seen = asyncio.run(_missing_bar(tmp_path))
    by_minute = {m: rest for m, *rest in seen}
    # 00:25:02 the 00:20 bar should be there and is not: asked, not fresh; asked again every minute until
    # the 00:25 bar closes (00:30:02), the checked mark moving with the clock each time.
    assert by_minute[25][:3] == [Due.BAR_CLOSED, False, 1]
    for m in range(26, 30):
        assert by_minute[m][:3] == [Due.LATE, False, 1], m
        assert by_minute[m][3] == clock.now_ms() - (35 - m) * MIN
    assert by_minute[30][:3] == [Due.BAR_CLOSED, True, 1]
    # the hole is re-read once, with the request the 00:35 bar needs anyway (from 00:20, weight 1); then it is
    # accepted: the series keeps its gap and later requests start after the newest bar again
    assert by_minute[35][:3] == [Due.BAR_CLOSED, True, 1]
    quiet = [m for m in range(1, 36) if m % 5 and not 25 < m < 30]
    assert all(by_minute[m][2] == 0 for m in quiet)
    assert_true_to(market, svc)
    t = svc.read("SYN000USDT", "5m")[0].open_time
    assert list(np.diff(t)[-3:] // (5 * MIN)) == [1, 2, 1]          # ... 00:10, 00:15, (no 00:20), 00:25, 00:30


async def _random_faults(home):
    market = synthetic_market(5, days=7, seed=8)
    t0 = market.span_ms[0] + 5 * DAY
    async with exchange(market, t0 + 2_000, home, data={"cache_file": ""}) as (sim, clock, _, _, svc):
        sim.faults.update({"duplicate_rate": 0.3, "disorder_rate": 0.3, "missing_rate": 0.3, "error_rate": 0.05, "seed": 3})
        reports = []
        with records() as logged:
            for quarter in range(4 * 12):           # 15-minute cycles: answers of several bars, for the damage to hit
                clock.set_ms(t0 + quarter * 15 * MIN + 2_000)
                reports.append(await svc.refresh(market.symbols))
        sim.faults.update({"duplicate_rate": 0.0, "disorder_rate": 0.0, "missing_rate": 0.0, "error_rate": 0.0})
        clock.advance(60)
        final = await svc.refresh(market.symbols)
        return market, svc, reports, final, logged


def test_random_damage_and_errors_over_twelve_hours(tmp_path):
    market, svc, reports, final, logged = asyncio.run(_random_faults(tmp_path))
    errors = [s for r in reports for s in r.series if s.error]
    assert errors and all("HTTP 503" in s.error and not s.fresh for s in errors)
    assert len(final.stale) == 0
    assert_true_to(market, svc)
    for kind in ("duplicate", "out_of_order", "missing", "TemporaryExchangeError"):
        assert svc.anomalies[kind] > 0, kind
    per_series_kind = {}
    for r in logged:
        key = (r.args[0], r.args[1], getattr(r, "anomaly", None))
        per_series_kind[key] = per_series_kind.get(key, 0) + 1
    assert per_series_kind and max(per_series_kind.values()) == 1


async def _errors(home):
    market = synthetic_market(2, days=7, seed=1)
    t0 = market.span_ms[0] + 5 * DAY
    async with exchange(market, t0 + 2_000, home, data={"cache_file": ""}) as (sim, clock, _, _, svc):
        with records() as logged:
            first = await svc.refresh([*market.symbols, "NOPEUSDT"])
            clock.advance(300)
            second = await svc.refresh([*market.symbols, "NOPEUSDT"])
        try:
            await svc.get_klines_incremental("NOPEUSDT", "5m")
            raised = None
        except UnknownSymbol as e:
            raised = e
        return first, second, logged, raised


def test_unknown_symbol_is_reported_per_series_and_logged_once(tmp_path):
    first, second, logged, raised = asyncio.run(_errors(tmp_path))
    bad = [s for s in first.series if s.symbol == "NOPEUSDT"]
    assert len(bad) == 3 and all("UnknownSymbol" in s.error and not s.fresh for s in bad)
    assert all(s.fresh for s in first.series if s.symbol != "NOPEUSDT")
    assert sum(1 for s in second.series if s.error) == 3
    assert len([r for r in logged if getattr(r, "anomaly", "") == "UnknownSymbol"]) == 3
    assert raised is not None and any("NOPEUSDT 5m" in n for n in raised.__notes__)


async def _concurrency(home):
    market = synthetic_market(10, days=7, seed=2)
    t0 = market.span_ms[0] + 5 * DAY
    async with exchange(market, t0 + 2_000, home, data={"max_concurrency": 4, "cache_file": ""}) as (sim, clock, _, client, svc):
        await svc.refresh(market.symbols)
        sim.faults.update({"latency_ms": 20})
        clock.advance(15 * 60)                  # 20 series due (5m and 15m), weight 1 each: weight in flight = requests
        peak, done = 0, False

        async def watch():
            nonlocal peak
            while not done:
                peak = max(peak, client.governor.stats().in_flight)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        report = await svc.refresh(market.symbols)
        done = True
        await watcher
        # one series asked for by a caller that gives up and by one that waits: one request, the second served
        clock.advance(300)
        r0 = klines_count(sim)[0]
        quitter = asyncio.create_task(svc.get_klines_incremental("SYN000USDT", "5m", 200))
        stayer = asyncio.create_task(svc.get_klines_incremental("SYN000USDT", "5m", 200))
        await asyncio.sleep(0.005)
        quitter.cancel()
        frame = await stayer
        return report, peak, klines_count(sim)[0] - r0, quitter.cancelled(), frame, clock.now_ms()


def test_requests_in_flight_are_bounded_and_shared(tmp_path):
    report, peak, requests, cancelled, frame, now = asyncio.run(_concurrency(tmp_path))
    assert (report.requests, report.weight, len(report.stale)) == (20, 20, 0)
    assert 2 <= peak <= 4
    assert requests == 1 and cancelled
    assert len(frame) == 200 and frame.open_time.iloc[-1] == (now - 2_000) // (5 * MIN) * (5 * MIN) - 5 * MIN


async def _policy_over_http(home, timeframes):
    market = synthetic_market(3, days=7, seed=6)
    t0 = market.span_ms[0] + 5 * DAY
    async with exchange(market, t0 + 2_000, home, data={"timeframes": timeframes, "cache_file": ""}) as (sim, clock, *_, svc):
        await svc.refresh(market.symbols)
        per_series = {}
        for minute in range(1, 61):
            clock.set_ms(t0 + minute * MIN + 2_000)
            for s in (await svc.refresh(market.symbols)).series:
                if s.fetched: per_series.setdefault((s.symbol, s.interval), []).append((minute, s.due))
        return per_series, klines_count(sim)


def test_ttl_bounds_unchecked_time_only_without_a_finer_timeframe(tmp_path):
    alone, (requests, weight) = asyncio.run(_policy_over_http(tmp_path, ["1h"]))
    for key, asked in alone.items():           # 1h alone: a TTL check about every five minutes, and the hourly bar
        assert {d for _, d in asked} == {Due.TTL, Due.BAR_CLOSED}, key
        assert 10 <= len(asked) <= 13
        assert all(b - a <= 5 for (a, _), (b, _) in zip(asked, asked[1:], strict=False))
    assert weight == requests - 3 + 3 * 2     # every check weight 1; only the first fills cost 2
    mixed, _ = asyncio.run(_policy_over_http(tmp_path, ["1h", "5m"]))
    for (sym, tf), asked in mixed.items():     # with 5m answers every five minutes, no TTL request at all
        assert {d for _, d in asked} == {Due.BAR_CLOSED}, (sym, tf)
        assert [m for m, _ in asked] == ([60] if tf == "1h" else list(range(5, 61, 5)))


async def _long_window(home):
    market = synthetic_market(1, days=9, seed=7)
    t0 = market.span_ms[0] + 5 * DAY
    cfg = {"timeframes": ["5m"], "limits": {"5m": 1000}, "cache_file": ""}
    async with exchange(market, t0 + 2_000, home, data=cfg) as (sim, clock, *_, svc):
        await svc.refresh(market.symbols)
        before = klines_count(sim)
        clock.advance(600 * 300)                # 600 bars later: less than the window of 1000
        report = await svc.refresh(market.symbols)
        after = klines_count(sim)
        return market, svc, report, (after[0] - before[0], after[1] - before[1]), before


def test_a_gap_shorter_than_the_window_is_one_request_not_pages(tmp_path):
    market, svc, report, (requests, weight), (first_requests, first_weight) = asyncio.run(_long_window(tmp_path))
    assert (first_requests, first_weight) == (1, 5)
    assert (requests, weight) == (1, 5)          # 600 bars: one request of weight 5, not 7 pages of 99
    assert report.series[0].rows_added == 600 and report.series[0].fresh
    assert_true_to(market, svc)
    assert len(svc.read("SYN000USDT", "5m")[0]) == 1000


RESTART = """
import asyncio, json, sys
from tradelab.exchange.client import BinanceClient
from tradelab.clock import TestClock
from tradelab.config import load_settings
from tradelab.data.service import DataService

async def main(url, home, now_ms, symbols):
    clock = TestClock(now_ms)
    settings = load_settings(env={}, home=home, exchange={"base_url": url})
    async with BinanceClient(settings.exchange, clock) as client:
        async with DataService(settings, client, clock) as svc:
            loaded = len(svc.series)
            report = await svc.refresh(symbols)
            frames = {f"{s} {tf}": svc.read(s, tf)[0].close.tolist() for s, tf in svc.series}
    print(json.dumps({"loaded": loaded, "requests": report.requests, "weight": report.weight,
                      "stale": len(report.stale), "frames": frames}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")))
"""


async def _restart(home):
    market = synthetic_market(3, days=7, seed=9)
    t0 = market.span_ms[0] + 5 * DAY
    async with exchange(market, t0 + 2_000, home) as (sim, clock, settings, client, svc):
        await svc.refresh(market.symbols)
        await svc.close()                               # writes the warm cache
        clock.advance(2 * 3600 + 17 * 60)               # down for 2 h 17 min
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RESTART, sim.url, str(home), str(clock.now_ms()),
                                                    ",".join(market.symbols), stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        no_cache = settings.model_copy(update={"data": settings.data.model_copy(update={"cache_file": ""})})
        cold = DataService(no_cache, client, clock)
        await cold.refresh(market.symbols)
        truth = {f"{s} {tf}": cold.read(s, tf)[0].close.tolist() for s, tf in cold.series}
        return json.loads(out), truth, proc.returncode


def test_restart_in_a_new_process_catches_up_with_one_request_per_series(tmp_path):
    result, truth, code = asyncio.run(_restart(tmp_path))
    assert code == 0
    assert result["loaded"] == 9 and result["stale"] == 0
    assert (result["requests"], result["weight"]) == (9, 9)   # one weight-1 request per series
    assert result["frames"] == truth
    assert (tmp_path / "klines.parquet").exists()


def test_an_exchange_that_answers_short_is_asked_again_until_the_series_is_current(tmp_path):
    "Every klines answer capped at 30 bars: the service keeps asking from where each answer ended, or says the series is stale."
    market = synthetic_market(2, 3, seed=4)
    start = market.span_ms[0] + 2 * DAY + 2_000

    async def go():
        async with exchange(market, start, str(tmp_path), data={"timeframes": ["1m"], "limits": {"1m": 100}}) as (
                sim, clock, settings, client, svc):
            sim.faults.update({"kline_cap": 30})
            df = await svc.get_klines_incremental("SYN000USDT", "1m", limit=100)
            first = (len(df), int(df.open_time.iloc[-1]), klines_count(sim)[0])
            clock.advance(2 * 3600)  # two hours, 120 bars to catch up 30 at a time
            rep = await svc.refresh(["SYN000USDT", "SYN001USDT"])
            caught = [(f.fresh, f.last_open_ms) for f in rep.series]
            sim.faults.update({"kline_cap": 1})
            clock.advance(3600)  # 60 bars, 20 requests of one bar each: still behind
            with records() as said:
                rep = await svc.refresh(["SYN000USDT"])
                try:
                    await svc.get_klines_incremental("SYN001USDT", "1m", limit=100)
                    raised = None
                except Exception as e:  # noqa: BLE001 - the error itself is what is checked
                    raised = e
            assert_true_to(market, svc)
            return first, caught, rep, [r.getMessage() for r in said if r.levelno == logging.WARNING], raised, clock.now_ms()

    first, caught, rep, warnings, raised, now = asyncio.run(go())
    newest = lambda t: (t - 2_000) // MIN * MIN - MIN  # noqa: E731 - the bar that closed last
    assert first == (100, newest(start), 4)  # 30 + 30 + 30 + 10: four requests, the whole window
    assert caught == [(True, newest(start + 2 * HOUR))] * 2
    assert [f.fresh for f in rep.series] == [False] and rep.series[0].last_open_ms == newest(now) - 40 * MIN
    assert any("answered 1 of" in w and "stale, not analysed" in w for w in warnings), warnings
    assert type(raised).__name__ == "DataError" and "stale" in str(raised)


def test_the_scan_never_ranks_a_symbol_whose_series_is_stale(tmp_path):
    "Answers capped at one bar after an hour away: no series catches up, none is analysed; uncapped, all are again."
    from tradelab.bot import TradingBot

    market = synthetic_market(12, 3, seed=5)
    clock = TestClock(market.span_ms[0] + 2 * DAY)

    async def go():
        async with SimServer(market, clock) as sim:
            settings = load_settings(env={}, home=str(tmp_path), exchange={"base_url": sim.url, "max_retries": 0},
                                     pool={"workers": 0},
                                     data={"timeframes": ["15m", "5m", "1m"], "limits": {"15m": 100, "5m": 100, "1m": 100}})
            bot = await TradingBot(settings, clock=clock).initialize()
            analysed, real = [], bot.components.analyzer.analyze_async

            async def seen(batch):  # our own analyser, wrapped to note what each scan analyses
                analysed.append(set(batch.symbols))
                return await real(batch)

            bot.components.analyzer.analyze_async = seen
            try:
                recs = [await bot.scan.run_once()]
                sim.faults.update({"kline_cap": 1})
                clock.advance(3600)
                recs.append(await bot.scan.run_once())
                sim.faults.update({"kline_cap": 0})
                clock.advance(60)
                recs.append(await bot.scan.run_once())
                return recs, analysed, set(bot.components.run.symbols)
            finally:
                await bot.stop()

    recs, analysed, symbols = asyncio.run(go())
    assert all(r.ok for r in recs) and len(symbols) == 12
    assert [r.counts["stale_skipped"] for r in recs] == [0, 12, 0]
    assert analysed == [symbols, set(), symbols]
