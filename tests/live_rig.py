"""What the live-trading tests share: a simulator with an account, a live backend on it, signals, waiting.

The simulator runs in-process (`SimServer`, with `open_account` and `inject_order_fault`), either in the test's own
event loop with a stepped `TestClock` the test moves, or in a thread of its own at real-time speed for the tests that
run a live backend in a child process and kill it. Everything else is the real thing: HTTP over loopback, SQLite.
"""
import asyncio
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tradelab.clock import Clock, SimClock
from tradelab.config import ExchangeSettings, LiveSettings, TradingSettings
from tradelab.exchange.orders import AccountClient
from tradelab.records import Side, Signal
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market
from tradelab.storage.store import Database, LiveOrderRepository, PositionRepository
from tradelab.trading.live import LiveExecution

SEED, N_SYMBOLS, DAYS = 11, 4, 3
TRADING = TradingSettings(risk_per_trade=0.005, max_open_positions=5, leverage_min=2, leverage_max=3, max_trades=3)


def market():
    return synthetic_market(N_SYMBOLS, DAYS, seed=SEED)


def signal_for(symbol: str, price: float, side: Side = Side.LONG, stop_pct: float = 0.05, target_pct: float = 0.05) -> Signal:
    "A signal on `symbol` around `price` with stop and target `stop_pct` / `target_pct` away."
    s = int(side)
    return Signal(symbol, side, price, price * (1 - s * stop_pct), price * (1 + s * target_pct), 0.6, np.zeros(0, np.float32))


def exchange_settings(url: str, key: str, secret: str, **kw) -> ExchangeSettings:
    return ExchangeSettings(base_url=url, api_key=key, api_secret=secret, max_retries=2, **kw)


def backend(client: AccountClient, clock: Clock, contracts, db: Database, live: LiveSettings | None = None,
            trading: TradingSettings = TRADING) -> LiveExecution:
    "A live backend on `client`, storing into `db`."
    return LiveExecution(trading, live or LiveSettings(), clock, contracts, client, store=PositionRepository(db),
                         legs=LiveOrderRepository(db))


@dataclass
class Rig:
    sim: SimServer
    key: str
    secret: str
    client: AccountClient
    contracts: dict
    db: Database

    def live(self, clock: Clock, **kw) -> LiveExecution:
        return backend(self.client, clock, self.contracts, self.db, **kw)


@asynccontextmanager
async def rig(db_path: Path, clock: Clock, balance: float = 10_000.0, timeout_s: float = 10.0):
    "A simulator on `clock` with one account, a trading client on it, a database."
    async with SimServer(market(), clock) as sim:
        key, secret = sim.open_account(balance)
        async with AccountClient(exchange_settings(sim.url, key, secret, timeout_s=timeout_s), clock) as client:
            contracts = await client.contracts()
            db = Database(db_path)
            try:
                yield Rig(sim, key, secret, client, contracts, db)
            finally:
                db.close()


class ThreadedSim:
    "A simulator at real-time speed in a thread of its own, for tests whose live backend runs in another process."

    def __init__(self):
        m = market()
        self.server = SimServer(m, SimClock(m.default_start_ms()))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim", daemon=True)

    def __enter__(self):
        self.thread.start()
        self.run(self.server.__aenter__())
        self.key, self.secret = self.call(lambda: self.server.open_account(10_000.0))
        return self

    def __exit__(self, *exc):
        self.run(self.server.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn):
        "`fn()` run in the simulator's thread (its state is not shared across threads otherwise)."
        async def inside():
            return fn()
        return self.run(inside())

    @property
    def url(self) -> str:
        return self.server.url
