"""Positions, virtual positions, paper execution and the breaker against real parts: the simulator over HTTP,
SQLite files, and the per-position rules as the specification of the vectorised book."""
import asyncio

import numpy as np
import pytest

from tradelab.exchange.client import BinanceClient
from tradelab.clock import TestClock
from tradelab.config import ExchangeSettings, RiskSettings, Settings, TradingSettings
from tradelab.errors import MalformedResponse
from tradelab.trading.execution import PaperExecution, Refusal
from tradelab.analysis.features import N_FEATURES
from tradelab.trading.positions import BarExtremes, ExitReason, Kind, Position, PositionBook, PositionState
from tradelab.sim.generators import random_positions
from tradelab.records import PriceSnapshot, Side, Signal, round_price, round_qty
from tradelab.trading.risk import BreakerStore, CircuitBreaker, Level
from tradelab.sim.server import SimServer
from tradelab.storage.store import BreakerRepository, Database, PositionRepository, RefusalRepository
from tradelab.sim.synthetic import synthetic_market
from tradelab.trading.virtual import VirtualPositionManager, fetch_bar_extremes

T0 = 1_700_000_000_000


def _breaker_store(db: Database) -> BreakerStore:
    "The store's two repositories on `db`, as the bot builds them."
    return BreakerStore(BreakerRepository(db), RefusalRepository(db))


@pytest.mark.parametrize("seed", range(6))
def test_book_matches_single_positions(seed):
    "The vectorised book and Position.update agree on every field, with extremes, funding, expiry and missing prices."
    rng = np.random.default_rng(seed)
    syms = [f"S{i}USDT" for i in range(40)]
    ps = random_positions(600, syms, T0, seed=seed, expiry_s=4 * 3600)
    twins = [Position.from_dict(p.to_dict()) for p in ps]
    book = PositionBook(capacity=1)
    for p in ps: book.add(p)
    px = np.full(len(syms), 100.0)
    for step in range(1, 12):
        now = T0 + step * 1_800_000 + int(rng.integers(0, 1000))
        px = px + rng.normal(0, 0.7, len(syms))
        listed = rng.random(len(syms)) > 0.05                      # a few symbols missing from a snapshot
        hi, lo = px + rng.uniform(0, 1, len(syms)), px - rng.uniform(0, 1, len(syms))
        since = now - 1_800_000
        bx = BarExtremes(since, {s: (h, lw) for s, h, lw in zip(syms, hi, lo, strict=True)})
        book.update(PriceSnapshot(np.array(syms)[listed], px[listed], now), now, funding_rate=0.0001, bar_extremes=bx,
                    slip=0.0002)
        ix = {s: i for i, s in enumerate(syms)}
        for q in twins:
            if not q.is_open: continue
            i = ix[q.symbol]
            if listed[i]:
                q.update(px[i], now, hi[i], lo[i], funding_rate=0.0001, slip=0.0002)
            elif now >= q.expiry_ms:                                # expiry at the last mark, as the book does
                q.close(q.mark * (1 - int(q.side) * 0.0002), ExitReason.EXPIRY, now)
    book.sync()
    by_id = {q.id: q for q in twins}
    for p in ps:
        q = by_id[p.id]
        assert (p.state, p.exit_reason, p.closed_ms) == (q.state, q.exit_reason, q.closed_ms)
        np.testing.assert_allclose([p.mark, p.mfe, p.mae, p.funding, p.net_pnl], [q.mark, q.mfe, q.mae, q.funding, q.net_pnl],
                                   rtol=1e-12, atol=1e-9)
    assert sum(p.state is PositionState.CLOSED for p in ps) > 0 and len(book) > 0


def _signal(sym, side, px, stop_share=0.004, conf=0.6):
    s = int(side)
    return Signal(sym, side, px, px * (1 - s * stop_share), px * (1 + 2 * s * stop_share), conf,
                  np.zeros(N_FEATURES, np.float32))


def test_virtual_over_http_survives_malformed_prices_and_uses_bar_extremes(tmp_path):
    "A malformed all-prices answer raises, loses nothing stored, and the next tick carries on; extremes catch touches."
    async def run():
        market = synthetic_market(20, 1, seed=9)
        clock = TestClock(market.default_start_ms())
        async with SimServer(market, clock) as sim, \
                BinanceClient(ExchangeSettings(base_url=sim.url, max_retries=0), clock) as client:
            snap = await client.all_prices()
            with Database(tmp_path / "v.sqlite") as db:
                repo = PositionRepository(db)
                vpm = VirtualPositionManager(Settings(trading=TradingSettings(max_trades=0, virtual_until=40)), clock, repo)
                await vpm.open_signals([_signal(s, side, snap.price(s)) for s in market.symbols for side in Side])
                assert len(vpm) == 40 and len(repo.load_open(Kind.VIRTUAL)) == 40
                clock.advance(60)
                sim.faults.update({"malformed_rate": 1.0})
                with pytest.raises(MalformedResponse):
                    await vpm.update_all_prices_async(client)
                sim.faults.update({"malformed_rate": 0.0})
                assert len(vpm) == 40 and len(repo.load_open(Kind.VIRTUAL)) == 40
                since = clock.now_ms()
                closed = []
                for _ in range(20):
                    clock.advance(60)
                    bx = await fetch_bar_extremes(client, {p.symbol for p in vpm.positions}, since)
                    since = clock.now_ms()
                    closed += await vpm.update_all_prices_async(client, bx)
                assert closed and len(repo.load_open(Kind.VIRTUAL)) == len(vpm)
                stored = db.conn.execute("SELECT COUNT(*) FROM archive WHERE kind = 'VIRTUAL'").fetchone()[0]
                assert stored == len(closed)
    asyncio.run(run())


def test_paper_over_http_respects_exchange_filters(tmp_path):
    "Paper entries through the simulator's own exchangeInfo: fills on the tick, sizes on the step, above min notional."
    async def run():
        market = synthetic_market(8, 1, seed=4)
        clock = TestClock(market.default_start_ms())
        async with SimServer(market, clock) as sim, BinanceClient(ExchangeSettings(base_url=sim.url), clock) as client:
            contracts = await client.contracts()
            snap = await client.all_prices()
            paper = PaperExecution(TradingSettings(max_open_positions=8), clock, contracts, client)
            opened = []
            for i, s in enumerate(market.symbols):
                x = await paper.open(_signal(s, Side.LONG if i % 2 else Side.SHORT, snap.price(s), 0.05, conf=i / 8), rank=i + 1)
                assert not isinstance(x, Refusal), x
                opened.append(x)
            for p in opened:
                info = contracts[p.symbol]
                assert round_price(info, p.entry) == p.entry and round_qty(info, p.size) == p.size
                assert p.entry * p.size >= info.min_notional
                assert int(p.side) * (p.entry - snap.price(p.symbol)) >= 0            # slippage against us
                assert 1 <= p.leverage <= 5
            assert sim.stats()["endpoints"]["/fapi/v2/ticker/price"]["requests"] == 1 + len(opened)
    asyncio.run(run())


def test_breaker_losing_streak_refuses_and_restores(tmp_path):
    "Losses move the breaker through its levels; refusals are stored; a restarted breaker resumes where it was."
    clock = TestClock(T0)
    with Database(tmp_path / "b.sqlite") as db:
        b = CircuitBreaker(RiskSettings(), clock, 10_000.0, _breaker_store(db))
        seen = []
        bal = 10_000.0
        for _ in range(8):
            bal -= 10
            seen.append(b.on_trade_closed(-10.0, bal))
            b.check_entry("BTCUSDT")
        assert seen == [Level.NORMAL] * 2 + [Level.REDUCED] * 2 + [Level.NO_NEW_ENTRIES] * 3 + [Level.HALTED]
        assert b.check_exit("BTCUSDT").allowed
        assert [r.reason for r in RefusalRepository(db).recent()][:1] == ["BREAKER_HALTED"]
    with Database(tmp_path / "b.sqlite") as db:
        again = CircuitBreaker(RiskSettings(), clock, 10_000.0, _breaker_store(db))
        assert again.restore() and again.to_dict() == b.to_dict()
        again.on_trade_closed(+50.0, bal + 50)
        assert again.level is Level.HALTED and not again.check_entry("ETHUSDT").allowed


def test_paper_and_virtual_positions_pay_each_symbols_settled_funding(tmp_path):
    "Across 08:00 UTC every open position, real or virtual, is charged its own symbol's rate, as premiumIndex gives it."
    from tradelab.bot import TradingBot
    from tradelab.config import load_settings

    market = synthetic_market(20, 4, seed=9)
    t_fund = (market.span_ms[0] // (8 * 3_600_000) + 8) * 8 * 3_600_000  # a funding time with history before it
    clock = TestClock(t_fund - 40 * 60_000)

    async def go():
        async with SimServer(market, clock) as sim:
            s = load_settings(env={}, home=str(tmp_path), exchange={"base_url": sim.url, "max_retries": 0}, pool={"workers": 0},
                              strategy={"min_confidence": 0.4}, trading={"expiry_s": 86_400.0},
                              data={"timeframes": ["15m", "5m", "1m"], "limits": {"15m": 100, "5m": 100, "1m": 100}})
            bot = await TradingBot(s, clock=clock).initialize()
            c = bot.components
            try:
                while clock.now_ms() < t_fund - 60_000:
                    assert (await bot.scan.run_once()).ok and (await bot.monitor.run_once()).ok
                    clock.advance(60)
                held = [*c.execution.positions, *c.virtual.positions]
                before = {p.id: (p.funding, p.size, int(p.side)) for p in held}
                requests = sim.stats()["endpoints"].get("/fapi/v1/premiumIndex", {}).get("requests", 0)
                clock.set_ms(t_fund + 5_000)
                assert (await bot.monitor.run_once()).ok
                c.virtual.book.sync()
                marks = {p.id: p.mark for p in [*c.execution.marked_positions(), *c.virtual.positions]}
                after = {p.id: p.funding for p in [*c.execution.positions, *c.virtual.positions]}
                asked = sim.stats()["endpoints"].get("/fapi/v1/premiumIndex", {}).get("requests", 0) - requests
                clock.advance(10)
                assert (await bot.monitor.run_once()).ok  # no funding time since: not asked again
                again = sim.stats()["endpoints"]["/fapi/v1/premiumIndex"]["requests"] - requests
                return held, before, after, marks, asked, again
            finally:
                await bot.stop()

    held, before, after, marks, asked, again = asyncio.run(go())
    still = [p for p in held if p.id in after]
    assert len(still) >= 3 and (asked, again) == (1, 1)
    rates = {p.symbol: round(market.funding_rate(p.symbol, t_fund), 8) for p in still}  # as premiumIndex prints it
    assert len(set(rates.values())) > 1  # each symbol its own rate
    for p in still:
        f0, size, side = before[p.id]
        assert after[p.id] - f0 == pytest.approx(-side * rates[p.symbol] * marks[p.id] * size, rel=1e-9), p.symbol
