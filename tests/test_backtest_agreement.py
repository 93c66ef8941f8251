"""The live path and the backtest agree: the same trades from the bot driven through the simulator and from a replay.

A synthetic market is served over loopback by `tradelab.sim` on a stepped clock. The bot scans once at every
close of a 1m bar (and ticks once inside each bar), as its loops would, paper trading with virtual positions; its
closed trades are read back from its SQLite archive. `tradelab.backtest` then replays the same bars over the same
cycles. The bot's kline limits reach back to the first bar of the market, so at every scan the bot's window is
the whole history a backtest reads: the features, and so the signals, are the same (the scan-equality check of
`tradelab.backtest.history` shows that part alone). What is compared is every closed trade, real and virtual:
symbol, side, entry time, exit reason, exit time, entry and exit prices to within the configured slippage, and the
funding each paid per unit held (the bot's from the simulator's premiumIndex, the backtest's from the same rates as a
history). Position sizes are not compared: they follow each book's equity at entry, which can differ by a fraction of a
percent between the two paths after some hours (seen: up to 0.6 %).

The bot scans exactly at each close (`data.boundary_delay_s` 0). A real bot waits 2 s by default, so what it
opens at a scan misses the high and low of its first bar (the books take a bar's extremes only for positions
open when the bar began) and is checked by ticks alone until that bar closes: a stop touched in those seconds
and left is seen by the backtest but not by the bot.
"""
import asyncio
import sqlite3

import numpy as np
import pandas as pd
import pytest

from tradelab.backtest.history import FundingHistory, cycle_times, history_from_frame, history_signals, market_frame
from tradelab.backtest.replay import quiet, replay
from tradelab.bot import TradingBot
from tradelab.clock import TestClock
from tradelab.config import load_settings
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market

MINUTE, FUNDING_MS = 60_000, 8 * 3_600_000
TIMEFRAMES = ["15m", "5m", "1m"]
HOURS = 24  # the bot's 1m window (limit 1500) must reach back to the market's first bar at every scan
FIRST_SCAN = 14 * 60  # minutes after the first bar: the 15m features are defined from here on
SLIPPAGE_BPS = 5.0


def _settings(url: str, home):
    return load_settings(
        env={}, home=str(home), exchange={"base_url": url, "max_retries": 0}, pool={"workers": 0},
        data={"timeframes": TIMEFRAMES, "limits": {"15m": 100, "5m": 300, "1m": 1500}, "boundary_delay_s": 0},
        trading={"slippage_bps": SLIPPAGE_BPS, "expiry_s": 2 * 3600, "max_trades": 3, "virtual_until": 8},
    )


async def _bot_trades(market, clock, home, scans):
    "Run the bot's scan at each of `scans` (ms) and one monitor tick inside each bar; its archived trades."
    async with SimServer(market, clock) as sim:
        settings = _settings(sim.url, home)
        bot = await TradingBot(settings, clock=clock).initialize()
        try:
            for t in scans:
                clock.set_ms(int(t))
                assert (await bot.scan.run_once()).ok
                clock.set_ms(int(t) + 30_000)
                assert (await bot.monitor.run_once()).ok
        finally:
            await bot.stop()
    with sqlite3.connect(home / "tradelab.sqlite") as db:
        rows = db.execute("SELECT kind, symbol, side, opened_ms, exit_reason, closed_ms, entry, exit_price, funding / size "
                          "FROM archive").fetchall()
    return settings, rows


def served(market) -> pd.DataFrame:
    "The market's 1m bars as the simulator serves them: prices and volumes printed to the symbol's decimals."
    frame = market_frame(market, "1m")
    for s in market.symbols:
        pdp, qdp = market.decimals(s)
        rows = frame["symbol"] == s
        frame.loc[rows, ["open", "high", "low", "close"]] = frame.loc[rows, ["open", "high", "low", "close"]].round(pdp)
        frame.loc[rows, "volume"] = frame.loc[rows, "volume"].round(qdp)
    return frame


def _key(kind: str, symbol: str, side: str, opened_ms: int, reason: str, closed_ms: int):
    return (kind.upper(), symbol, side.upper(), int(opened_ms), reason.upper(), int(closed_ms))


def test_the_bots_trades_and_the_backtests_are_the_same_trades(tmp_path):
    market = synthetic_market(12, HOURS / 24 + 0.05, seed=21)
    t0 = market.span_ms[0]
    scans = t0 + np.arange(FIRST_SCAN, HOURS * 60 - 5) * MINUTE
    clock = TestClock(int(scans[0]))
    settings, live = asyncio.run(_bot_trades(market, clock, tmp_path, scans))

    h = history_from_frame(served(market), TIMEFRAMES, "synthetic")
    cyc = cycle_times(h, int(scans[0]), int(scans[-1]))
    assert np.array_equal(cyc, scans)
    signals = history_signals(h, settings.strategy, cyc)
    times = np.arange(-(-int(cyc[0]) // FUNDING_MS) * FUNDING_MS, int(cyc[-1]) + 1, FUNDING_MS)
    funding = FundingHistory("the simulator's premiumIndex", {s: times for s in market.symbols},  # the rates the bot was given
                             {s: np.array([round(market.funding_rate(s, int(t)), 8) for t in times]) for s in market.symbols})
    with quiet():
        r = asyncio.run(replay(h, settings, cyc, signals, funding=funding, contracts=market.infos))
    back = {_key(p.kind.name, p.symbol, p.side.name, p.opened_ms, p.exit_reason.name, p.closed_ms): p
            for p in r.real + r.virtual}
    bot = {}
    for kind, symbol, side, opened, reason, closed, entry, exit_price, paid in live:
        bot[_key(kind, symbol, side, opened, reason, closed)] = (entry, exit_price, paid)

    real = [k for k in back if k[0] == "REAL"]
    assert len(real) >= 5 and len(back) - len(real) >= 5, f"too few trades to compare: {len(real)} real, {len(back)} in all"
    assert set(bot) == set(back), (
        f"only the bot: {sorted(set(bot) - set(back))[:5]}; only the backtest: {sorted(set(back) - set(bot))[:5]}"
    )
    tol = SLIPPAGE_BPS / 10_000
    for k, p in back.items():
        entry, exit_price, paid = bot[k]
        assert entry == pytest.approx(p.entry, rel=tol) and exit_price == pytest.approx(p.exit_price, rel=tol), k
        assert paid == pytest.approx(p.funding / p.size, rel=1e-9, abs=1e-15), k  # per unit held: the same rate, time and mark
    assert any(p.funding != 0 for p in back.values())

