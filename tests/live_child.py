"""A live backend in a process of its own, for the kill tests (`python live_child.py URL KEY SECRET DB MARKER HOW SYMBOLS`).

It opens one position per symbol on the simulator, writes the position ids to MARKER, and waits to be killed. With
HOW = `before_stop` its algo orders never leave: the marker is written when the first entry has filled and its stop is
about to be sent, and the process then hangs there (the moment a crash would leave a position unprotected).
"""
import asyncio
import json
import sys
from pathlib import Path

from live_rig import TRADING, backend, exchange_settings, signal_for
from tradelab.clock import LiveClock
from tradelab.exchange.orders import AccountClient
from tradelab.storage.store import Database


class StopNeverLeaves(AccountClient):
    "A client whose algo orders hang before they are sent: the process dies between the entry's fill and the stop."

    marker: Path

    async def new_algo_order(self, params):
        self.marker.write_text(json.dumps({"hanging": params["clientAlgoId"]}))
        await asyncio.Event().wait()


async def main(url: str, key: str, secret: str, db_path: str, marker: str, how: str, symbols: str) -> None:
    clock = LiveClock()
    cls = StopNeverLeaves if how == "before_stop" else AccountClient
    async with cls(exchange_settings(url, key, secret), clock) as client:
        client.marker = Path(marker)
        await client.sync_clock()
        contracts = await client.contracts()
        live = backend(client, clock, contracts, Database(db_path), trading=TRADING)
        await live.reconcile(full=True)
        prices, opened = await client.all_prices(), []
        for sym in symbols.split(","):
            p = await live.open(signal_for(sym, prices.price(sym)))
            opened.append(p.id if hasattr(p, "id") else repr(p))
        Path(marker).write_text(json.dumps({"opened": opened}))
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:8]))
