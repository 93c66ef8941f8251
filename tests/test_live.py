"""Live trading against the simulator, over HTTP: the issue's acceptance, one test per failure mode.

A `LiveExecution` is driven directly with a stepped clock shared with an in-process simulator (`live_rig.rig`), or
runs in a child process that is killed with SIGKILL (`live_child.py`) while the simulator runs at real-time speed in a
thread. In every test the store, the simulator's account and its `income` must agree, and nothing may be left
doubled or unprotected.
"""
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from live_rig import ThreadedSim, backend, exchange_settings, rig, signal_for
from processes import wait_for
from tradelab.cli import main
from tradelab.clock import LiveClock, TestClock
from tradelab.config import LiveSettings
from tradelab.errors import OrderRejected, StateError
from tradelab.exchange.orders import ORDER, AccountClient, client_id, on_step, order_params
from tradelab.records import Side
from tradelab.sim.rules import Faults
from tradelab.storage.store import Database
from tradelab.trading.execution import Refusal, RefusalReason
from tradelab.trading.positions import ExitReason, Kind, PositionState

HERE = Path(__file__).parent


def _start() -> int:
    from live_rig import market

    return market().default_start_ms()


async def _income_of(client, p) -> dict[str, float]:
    "The account's bookings for `p`'s symbol while it was open, summed by type."
    rows = await client.income(p.symbol, start_ms=p.opened_ms - 1_000, end_ms=p.closed_ms + 1_000)
    out: dict[str, float] = {}
    for r in rows:
        out[r.income_type] = out.get(r.income_type, 0.0) + r.income
    return out


def _agrees(p, income: dict[str, float]) -> None:
    "The store's figures of a closed position are the exchange's bookings."
    assert p.fees == pytest.approx(-income.get("COMMISSION", 0.0), abs=1e-6)
    assert p.funding == pytest.approx(income.get("FUNDING_FEE", 0.0), abs=1e-6)
    assert p.realized_pnl == pytest.approx(sum(income.values()), abs=1e-6)


async def _step_until(live, clock, done, minutes: int = 24 * 60, step_s: float = 60.0):
    "Move the clock a minute at a time, one monitor tick each, until `done()`; the positions closed on the way."
    closed = []
    for _ in range(minutes):
        clock.advance(step_s)
        closed += await live.update(await live.client.all_prices())
        if done(closed):
            return closed
    raise AssertionError("the condition was not reached within the simulated time")


async def _moving(clock, coro):
    "Await `coro` while the stepped clock moves a second every few milliseconds (a backoff waits on it)."
    task = asyncio.ensure_future(coro)
    while not task.done():
        await asyncio.sleep(0.005)
        clock.advance(1)
    return task.result()


def _target_ahead(sym: str, start_ms: int, price: float, minutes: int = 600):
    "A long's (stop, target) such that the target is reached, on the 1m bars ahead, before the stop."
    import numpy as np
    from live_rig import market

    s = market().series(sym)
    i = int(np.searchsorted(s.open_time, start_ms))
    hi, lo = s.high[i + 1 : i + minutes], s.low[i + 1 : i + minutes]
    k = int(np.argmax(hi))
    target = price + 0.5 * (hi[k] - price)
    stop = min(lo[: k + 1].min(), price) * 0.98
    return stop, target


# ---------------------------------------------------------------------------------------------------------------------
# A trade end to end: opened, protected on the exchange, target hit, the stop cancelled, booked from the exchange


def test_open_protect_target_and_agree_with_income(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            live = r.live(clock)
            await live.reconcile(full=True)
            sym = sorted(r.contracts)[0]
            price = (await r.client.all_prices()).price(sym)
            stop, target = _target_ahead(sym, clock.now_ms(), price)
            sig = signal_for(sym, price)
            sig = type(sig)(sym, Side.LONG, price, stop, target, 0.6, sig.features)
            p = await live.open(sig)
            assert not isinstance(p, Refusal), p
            algos = r.sim.exchange.open_algo_orders(r.key)
            kinds = sorted(a.get("orderType") or a["type"] for a in algos)
            assert kinds == ["STOP_MARKET", "TAKE_PROFIT_MARKET"]
            assert all(str(a["clientAlgoId"]).startswith("tl-" + p.id[:20]) for a in algos)
            [row] = r.sim.exchange.positions(r.key)
            assert float(row["positionAmt"]) == pytest.approx(p.size)
            closed = await _step_until(live, clock, lambda c: c)
            assert [c.id for c in closed] == [p.id] and p.exit_reason is ExitReason.TARGET
            assert r.sim.exchange.open_algo_orders(r.key) == [] and r.sim.exchange.positions(r.key) == []
            _agrees(p, await _income_of(r.client, p))
            stored = live.store.get(p.id)
            assert stored.state is PositionState.CLOSED and stored.realized_pnl == pytest.approx(p.realized_pnl)
            every = await r.client.income()
            assert r.sim.exchange.balance(r.key) == pytest.approx(10_000.0 + sum(i.income for i in every), abs=1e-6)
            assert ("POST " + ORDER, 400) not in r.client.stats.by_status  # nothing was refused on the order endpoint

    asyncio.run(go())


def test_funding_and_command_close_agree_with_income(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            live = r.live(clock)
            await live.reconcile(full=True)
            sym = sorted(r.contracts)[1]
            price = (await r.client.all_prices()).price(sym)
            p = await live.open(signal_for(sym, price, Side.SHORT, stop_pct=0.3, target_pct=0.3))
            assert not isinstance(p, Refusal), p
            eight_h = 8 * 3_600_000
            clock.set_ms((clock.now_ms() // eight_h + 1) * eight_h + 60_000)  # past a funding time
            assert await live.update(await r.client.all_prices()) == []
            await live.close(p)
            assert p.exit_reason is ExitReason.COMMAND
            income = await _income_of(r.client, p)
            assert income.get("FUNDING_FEE", 0.0) != 0.0
            _agrees(p, income)
            assert r.sim.exchange.positions(r.key) == [] and r.sim.exchange.open_algo_orders(r.key) == []

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------------------------
# The entry POST times out but the order was placed: found by its client id, never sent twice (and a 5xx that placed
# nothing: looked up, not found, sent again once with the same id)


@pytest.mark.parametrize("fault", ["accept_then_timeout", "accept_then_drop", "reject_5xx"])
def test_entry_timeout_but_placed_is_found_not_doubled(tmp_path, fault):
    async def go():
        clock = TestClock(_start())
        from live_rig import market
        from tradelab.sim.server import SimServer

        async with SimServer(market(), clock, faults=Faults(timeout_s=3.0)) as sim:
            key, secret = sim.open_account(10_000.0)
            async with AccountClient(exchange_settings(sim.url, key, secret, timeout_s=1.0), clock) as client:
                contracts = await client.contracts()
                live = backend(client, clock, contracts, Database(tmp_path / "live.sqlite"))
                await live.reconcile(full=True)
                sym = sorted(contracts)[0]
                sim.inject_order_fault(fault, "/fapi/v1/order", 1)
                p = await _moving(clock, live.open(signal_for(sym, (await client.all_prices()).price(sym))))
                assert not isinstance(p, Refusal), p
                entries = [o for o in sim.exchange.orders.values() if o.client_id == client_id(p.id, "entry")]
                assert len(entries) == 1 and entries[0].status == "FILLED"
                unknown = ("POST " + ORDER, 0 if fault == "accept_then_drop" else 503)  # 0: no answer in time
                assert client.stats.by_status.get(unknown) == 1
                [row] = sim.exchange.positions(key)
                assert float(row["positionAmt"]) == pytest.approx(p.size)  # one entry's worth, not two
                assert len(sim.exchange.open_algo_orders(key)) == 2

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------------------------
# Orders rejected for precision or margin; conditional types never on /fapi/v1/order


def test_rejections_for_precision_and_margin(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            sym = sorted(r.contracts)[0]
            info, price = r.contracts[sym], (await r.client.all_prices()).price(sym)
            too_fine = repr(info.market_step_size / 10 + info.market_min_qty * 3)
            with pytest.raises(OrderRejected) as e:
                await r.client.new_order(order_params(sym, "BUY", "MARKET", too_fine, "tl-precision-test"))
            assert e.value.code == -1111
            huge = on_step(round(1_000_000 / price / info.market_step_size) * info.market_step_size, info.market_step_size)
            with pytest.raises(OrderRejected) as e:
                await r.client.new_order(order_params(sym, "BUY", "MARKET", huge, "tl-margin-test"))
            assert e.value.code == -2019
            assert r.sim.exchange.positions(r.key) == [] and r.sim.exchange.open_orders(r.key) == []
            # through the backend: the margin is taken by a resting order the bot does not know, the entry is refused
            live = r.live(clock)
            await live.reconcile(full=True)
            bid = round(price * 0.5 / info.tick_size) * info.tick_size
            far = order_params(sym, "BUY", "LIMIT", on_step(round(9_900 * 3 / bid / info.step_size) * info.step_size, info.step_size),
                               "hand_far_bid", price=on_step(bid, info.tick_size), time_in_force="GTC")
            await r.client.set_leverage(sym, 3)
            await r.client.new_order(far)
            other = sorted(r.contracts)[1]
            out = await live.open(signal_for(other, (await r.client.all_prices()).price(other)))
            assert isinstance(out, Refusal) and out.reason is RefusalReason.EXCHANGE_REJECTED, out
            assert live.positions == [] and r.sim.exchange.positions(r.key) == []
            assert live.store.counts().get(("REAL", "CLOSED"), 0) == 1  # the PENDING row, cancelled

    asyncio.run(go())


def test_conditional_types_never_reach_the_order_endpoint(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            sym = sorted(r.contracts)[0]
            with pytest.raises(StateError, match="-4120"):
                order_params(sym, "SELL", "STOP_MARKET", "1", "tl-x")
            raw = {"symbol": sym, "side": "SELL", "type": "STOP_MARKET", "quantity": "1", "stopPrice": "1",
                   "newClientOrderId": "hand-stop"}
            with pytest.raises(OrderRejected) as e:
                await r.client.signed("POST", ORDER, raw, lambda d, _: d)  # what a careless client would send
            assert e.value.code == -4120
            live = r.live(clock)
            await live.reconcile(full=True)
            p = await live.open(signal_for(sym, (await r.client.all_prices()).price(sym)))
            await live.close(p)
            posted = r.client.stats.by_status
            assert posted.get(("POST " + ORDER, 400), 0) == 1  # the careless one above, and nothing of tradelab's
            assert posted.get(("POST /fapi/v1/algoOrder", 200), 0) == 2  # stop and target went to the Algo Service
            seen = [row for row in r.sim.requests.rows() if row[1] == ORDER and row[2] == 400]
            assert len(seen) == 1  # the simulator's own log agrees

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------------------------
# Restarts: a position closed by hand while the bot was down; a stranger's position adopted or flattened


def test_position_closed_by_hand_while_down(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            first = r.live(clock)
            await first.reconcile(full=True)
            sym = sorted(r.contracts)[2]
            p = await first.open(signal_for(sym, (await r.client.all_prices()).price(sym)))
            # the bot goes down; a hand closes the position on the exchange (its legs stay)
            clock.advance(600)
            step = r.contracts[sym].market_step_size
            await r.client.new_order(order_params(sym, "SELL", "MARKET", on_step(p.size, step), "web_hand_close", reduce_only=True))
            clock.advance(600)
            second = r.live(clock)
            assert second.restore() == 1
            closed = await second.reconcile(full=True)
            [q] = closed
            assert q.id == p.id and q.exit_reason is ExitReason.COMMAND and second.positions == []
            assert r.sim.exchange.open_algo_orders(r.key) == [] and r.sim.exchange.positions(r.key) == []
            _agrees(q, await _income_of(r.client, q))
            assert any(a[2] == "closed_on_exchange" for a in second.legs.actions())

    asyncio.run(go())


@pytest.mark.parametrize("unknown", ["adopt", "flatten"])
def test_unknown_position_is_adopted_or_flattened(tmp_path, unknown):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            sym = sorted(r.contracts)[0]
            info, price = r.contracts[sym], (await r.client.all_prices()).price(sym)
            qty = on_step(round(300 / price / info.market_step_size) * info.market_step_size, info.market_step_size)
            await r.client.new_order(order_params(sym, "BUY", "MARKET", qty, "web_by_hand"))
            live = r.live(clock, live=LiveSettings(unknown_positions=unknown))
            await live.reconcile(full=True)
            if unknown == "adopt":
                [p] = live.positions
                assert p.symbol == sym and p.size == pytest.approx(float(qty))
                assert len(r.sim.exchange.open_algo_orders(r.key)) == 2
                assert live.store.get(p.id) is not None
            else:
                assert live.positions == [] and r.sim.exchange.positions(r.key) == []
            assert [a[2] for a in live.legs.actions()] == [unknown]

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------------------------
# Killed with SIGKILL: between the entry's fill and the stop; with open positions and orders


def _child(sim: ThreadedSim, db: Path, marker: Path, how: str, symbols: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(HERE / "live_child.py"), sim.url, sim.key, sim.secret, str(db), str(marker),
                             how, ",".join(symbols)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(marker.with_suffix(".log"), "w"))


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


async def _restart(sim: ThreadedSim, db: Path):
    "A new backend on the same database and account; its first reconciliation."
    clock = LiveClock()
    async with AccountClient(exchange_settings(sim.url, sim.key, sim.secret), clock) as client:
        await client.sync_clock()
        live = backend(client, clock, await client.contracts(), Database(db))
        live.restore()
        closed = await live.reconcile(full=True)
        return live, closed


def test_killed_between_entry_fill_and_stop_restart_places_it(tmp_path):
    with ThreadedSim() as sim:
        symbols = sorted(sim.call(lambda: list(sim.server.market.entries)))[:1]
        db, marker = tmp_path / "live.sqlite", tmp_path / "marker.json"
        proc = _child(sim, db, marker, "before_stop", symbols)
        try:
            wait_for(lambda: marker.exists() and "hanging" in marker.read_text(), 60, "the entry to fill and the stop to hang")
        finally:
            _kill(proc)
        assert len(sim.call(lambda: sim.server.exchange.positions(sim.key))) == 1
        assert sim.call(lambda: sim.server.exchange.open_algo_orders(sim.key)) == []  # unprotected: the crash's damage
        live, closed = asyncio.run(_restart(sim, db))
        assert closed == []
        [p] = live.positions
        assert p.state is PositionState.OPEN
        algos = sim.call(lambda: sim.server.exchange.open_algo_orders(sim.key))
        assert len(algos) == 2 and {a["clientAlgoId"][:23] for a in algos} == {"tl-" + p.id[:20]}
        [row] = sim.call(lambda: sim.server.exchange.positions(sim.key))
        assert float(row["positionAmt"]) == pytest.approx(p.size)  # one entry: nothing sent twice
        assert "place_leg stop" in [a[2] for a in live.legs.actions()]


def test_killed_with_open_positions_restart_reconciles_nothing_doubled(tmp_path):
    with ThreadedSim() as sim:
        symbols = sorted(sim.call(lambda: list(sim.server.market.entries)))[:2]
        db, marker = tmp_path / "live.sqlite", tmp_path / "marker.json"
        proc = _child(sim, db, marker, "protected", symbols)
        try:
            wait_for(lambda: marker.exists() and "opened" in marker.read_text(), 60, "two protected positions")
        finally:
            _kill(proc)
        opened = json.loads(marker.read_text())["opened"]
        before = sim.call(lambda: sorted(a["clientAlgoId"] for a in sim.server.exchange.open_algo_orders(sim.key)))
        live, closed = asyncio.run(_restart(sim, db))
        assert closed == [] and sorted(p.id for p in live.positions) == sorted(opened)
        after = sim.call(lambda: sorted(a["clientAlgoId"] for a in sim.server.exchange.open_algo_orders(sim.key)))
        assert after == before and len(after) == 4  # nothing placed again, nothing lost
        assert live.legs.actions() == []  # store and exchange agreed


# ---------------------------------------------------------------------------------------------------------------------
# Safety: tradelab flatten; live without confirmation or on an unnamed mainnet


def _live_env(url: str, key: str, secret: str, **more: str) -> dict:
    base = {"TRADELAB_EXCHANGE__BASE_URL": url, "TRADELAB_EXCHANGE__API_KEY": key, "TRADELAB_EXCHANGE__API_SECRET": secret,
            "TRADELAB_LIVE__ACCOUNT": "sim-main"}
    return {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | base | more


def test_flatten_leaves_no_order_and_no_position(tmp_path):
    with ThreadedSim() as sim:
        symbols = sorted(sim.call(lambda: list(sim.server.market.entries)))[:2]
        db, marker = tmp_path / "live.sqlite", tmp_path / "marker.json"
        proc = _child(sim, db, marker, "protected", symbols)
        try:
            wait_for(lambda: marker.exists() and "opened" in marker.read_text(), 60, "two protected positions")
        finally:
            _kill(proc)
        env = _live_env(sim.url, sim.key, sim.secret)
        refused = subprocess.run([str(Path(sys.executable).with_name("tradelab")), "flatten"], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 2 and "--confirm-live sim-main" in refused.stderr
        done = subprocess.run([str(Path(sys.executable).with_name("tradelab")), "flatten", "--confirm-live", "sim-main"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert sum(line.startswith("cancelled algo order") for line in lines) == 4
        assert sum(line.startswith("closed ") for line in lines) == 2
        assert lines[-1].endswith("flat, no open order and no position")
        assert sim.call(lambda: sim.server.exchange.positions(sim.key)) == []
        assert sim.call(lambda: sim.server.exchange.open_orders(sim.key)) == []
        assert sim.call(lambda: sim.server.exchange.open_algo_orders(sim.key)) == []
        assert sim.key not in done.stdout + done.stderr and sim.secret not in done.stdout + done.stderr


@pytest.mark.parametrize("extra, missing", [
    ({}, "--confirm-live sim-main"),
    ({"TRADELAB_LIVE__CONFIRM": "another"}, "not confirmed"),
    ({"TRADELAB_EXCHANGE__BASE_URL": "binance", "TRADELAB_LIVE__CONFIRM": "sim-main"}, "needs live.mainnet = true"),
])
def test_live_without_confirmation_or_unnamed_mainnet_stops_with_one_line(tmp_path, capsys, extra, missing):
    env = _live_env("http://127.0.0.1:9", "k" * 16, "s" * 16, TRADELAB_MODE="live", TRADELAB_HOME=str(tmp_path), **extra)
    assert main(["run"], env=env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0], err
    assert "k" * 16 not in err[0] and "s" * 16 not in err[0]


# ---------------------------------------------------------------------------------------------------------------------
# The whole bot in live mode: it opens, protects and closes positions, and agrees with the exchange's books


def test_live_bot_opens_protects_closes_and_agrees_with_income(tmp_path):
    from tradelab.bot import BotControl, TradingBot
    from tradelab.config import load_settings
    from tradelab.sim.server import SimServer
    from tradelab.sim.synthetic import synthetic_market

    async def go():
        market = synthetic_market(12, 4, seed=7)
        clock = TestClock(market.span_ms[0] + 2 * 86_400_000)
        async with SimServer(market, clock) as sim:
            key, secret = sim.open_account(10_000.0)
            settings = load_settings(
                env={}, mode="live", home=str(tmp_path),
                exchange={"base_url": sim.url, "api_key": key, "api_secret": secret, "max_retries": 0},
                live={"account": "sim", "confirm": "sim", "max_order_notional": 2_000.0},
                data={"timeframes": ["15m", "5m", "1m"], "limits": {"15m": 100, "5m": 100, "1m": 100}},
                universe={"top_n": 12}, pool={"workers": 0}, strategy={"min_confidence": 0.5},
                trading={"expiry_s": 1800, "max_exposure": 20, "max_trades": 2, "risk_per_trade": 0.005},
                risk={"losses_reduce": 20, "losses_pause": 30, "losses_halt": 40},
            )
            bot = await TradingBot(settings, clock=clock).initialize()
            c = bot.components
            assert c.execution.name == "live"
            protected = set()
            try:
                for _ in range(240):
                    clock.advance(60)
                    assert (await bot.scan.run_once()).ok
                    algos = {a["clientAlgoId"][3:23] for a in sim.exchange.open_algo_orders(key)}
                    for p in c.execution.positions:  # every open position is protected on the exchange
                        assert p.id[:20] in algos, p
                        protected.add(p.id)
                    for _ in range(3):
                        clock.advance(20)
                        assert (await bot.monitor.run_once()).ok
                    if c.run.counters["closed"] >= 3:
                        break
                await BotControl(bot).flatten()
                counters = dict(c.run.counters)
                print("live bot:", counters, len(protected), "protected")
                assert counters["opened"] >= 3 and counters["closed"] >= 3, counters
                assert sim.exchange.positions(key) == [] and sim.exchange.open_algo_orders(key) == []
                assert sim.exchange.open_orders(key) == []
                rows = c.db.query("SELECT id, fees, funding, realized_pnl FROM positions WHERE kind = 'REAL' AND state = 'CLOSED' "
                                  "AND exit_reason != 'CANCELLED'")
                assert {r[0] for r in rows} == protected
                income = await c.client.income()
                by_type: dict[str, float] = {}
                for i in income:
                    by_type[i.income_type] = by_type.get(i.income_type, 0.0) + i.income
                assert sum(r[1] for r in rows) == pytest.approx(-by_type.get("COMMISSION", 0.0), abs=1e-6)
                assert sum(r[2] for r in rows) == pytest.approx(by_type.get("FUNDING_FEE", 0.0), abs=1e-6)
                assert sum(r[3] for r in rows) == pytest.approx(sum(by_type.values()), abs=1e-6)
                assert sim.exchange.balance(key) == pytest.approx(10_000.0 + sum(by_type.values()), abs=1e-6)
                assert c.archive.count(Kind.REAL) == len(rows)
                refused = [row for row in sim.requests.rows() if row[1] == ORDER and row[2] != 200]
                assert refused == []  # no -4120 (nor any other refusal) on the order endpoint in the whole run
            finally:
                await bot.stop()

    asyncio.run(go())


def test_limit_ioc_entry_and_the_notional_cap(tmp_path):
    async def go():
        clock = TestClock(_start())
        async with rig(tmp_path / "live.sqlite", clock) as r:
            live = r.live(clock, live=LiveSettings(entry="limit_ioc", max_order_notional=300.0, max_total_notional=500.0))
            await live.reconcile(full=True)
            a, b = sorted(r.contracts)[:2]
            prices = await r.client.all_prices()
            p = await live.open(signal_for(a, prices.price(a)))
            assert not isinstance(p, Refusal), p
            entry = await r.client.query_order(a, client_id(p.id, "entry"))
            assert (entry.type, entry.status) == ("LIMIT", "FILLED") and p.notional <= 300.0 + 1e-9
            q = await live.open(signal_for(b, prices.price(b)))
            assert not isinstance(q, Refusal), q
            assert p.notional + q.notional <= 500.0 + 1e-6  # the second was cut to what the total cap left
            assert len(r.sim.exchange.open_algo_orders(r.key)) == 4

    asyncio.run(go())
