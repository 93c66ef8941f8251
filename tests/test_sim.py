"""The exchange simulator as outside clients see it: ccxt's binanceusdm, and `tradelab sim` as a process."""
import asyncio
import json
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import ccxt
import numpy as np
import pytest

from tradelab.clock import TestClock
from tradelab.config import shared_data_dir
from tradelab.sim.source import load_parquet_market
from tradelab.sim.server import SimServer
from tradelab.sim.synthetic import synthetic_market

TRADELAB = str(Path(sys.executable).with_name("tradelab"))


def ccxt_client(url: str) -> ccxt.binanceusdm:
    "A ccxt binanceusdm client whose USD-M endpoints point at `url`, with no spot currency lookup."
    ex = ccxt.binanceusdm({"enableRateLimit": False, "options": {"fetchCurrencies": False}})
    for key, value in ex.urls["api"].items():
        if key.startswith("fapi"): ex.urls["api"][key] = value.replace("https://fapi.binance.com", url)
    return ex


async def _ccxt_scenario():
    market = synthetic_market(4, 2, seed=5)
    async with SimServer(market, TestClock(market.default_start_ms())) as sim:
        ex = ccxt_client(sim.url)
        markets = await asyncio.to_thread(ex.load_markets)
        ohlcv = await asyncio.to_thread(ex.fetch_ohlcv, "SYN001/USDT:USDT", "15m", None, 50)
        tickers = await asyncio.to_thread(ex.fetch_tickers)
        errors = []
        for call in (lambda: ex.fapiPublicGetKlines({"symbol": "NOPEUSDT", "interval": "1m"}),
                     lambda: ex.fapiPublicGetKlines({"symbol": "SYN001USDT", "interval": "1m", "limit": 5000})):
            try: await asyncio.to_thread(call)
            except ccxt.BaseError as e: errors.append(e)
        sim.faults.force_status = 429
        try: await asyncio.to_thread(ex.fetch_ticker, "SYN000/USDT:USDT")
        except ccxt.BaseError as e: errors.append(e)
        return market, sim.clock.now_ms(), markets, ohlcv, tickers, errors, sim.stats()


def test_ccxt_reads_markets_ohlcv_and_tickers():
    market, now, markets, ohlcv, tickers, errors, stats = asyncio.run(_ccxt_scenario())
    swaps = {m["id"]: m for m in markets.values() if m["swap"]}
    assert set(swaps) == set(market.symbols)
    m = swaps["SYN001USDT"]
    assert m["linear"] and m["settle"] == "USDT" and m["precision"]["price"] == market.infos["SYN001USDT"].tick_size
    bars = np.array(ohlcv)
    ref = market.series("SYN001USDT", "15m")
    i = int(np.searchsorted(ref.open_time, bars[0, 0]))
    assert len(bars) == 50 and bars[-1, 0] <= now < bars[-1, 0] + 900_000  # the last row is the forming bar
    np.testing.assert_allclose(bars[:-1, 4], ref.close[i:i + 49])
    assert set(tickers) == {f"SYN00{k}/USDT:USDT" for k in range(4)}
    assert all(t["last"] > 0 and t["quoteVolume"] > 0 for t in tickers.values())
    assert [type(e) for e in errors[:2]] == [ccxt.BadSymbol, ccxt.BadRequest]
    assert isinstance(errors[2], ccxt.DDoSProtection)  # ccxt's class for 429 / 418
    assert stats["endpoints"]["/fapi/v1/exchangeInfo"]["requests"] == 1 and stats["status_429"] == 1


class SimProcess:
    "`tradelab sim ...` as a child process; the URL is read from its first line of output."
    def __init__(self, *args: str, wait_s: float = 60):
        self.proc = subprocess.Popen([TRADELAB, "sim", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, line = time.monotonic() + wait_s, ""
        while "http://" not in line:
            if self.proc.poll() is not None: raise AssertionError(f"tradelab sim exited: {self.proc.stderr.read()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready: raise AssertionError("tradelab sim printed no URL in time")
            line = self.proc.stdout.readline()
        self.url = line[line.index("http://"):].split()[0]

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r: return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e: return e.code, json.loads(e.read()), e.headers

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r: return json.loads(r.read())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try: return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None: self.proc.kill()


def test_command_serves_a_synthetic_market_and_stops_on_sigterm():
    sim = SimProcess("--synthetic", "20", "--days", "3", "--seed", "7", "--stepped", "--start", "2024-01-02T12:00")
    try:
        status, body, headers = sim.get("/fapi/v1/time")
        assert (status, body, headers["X-MBX-USED-WEIGHT-1M"]) == (200, {"serverTime": 1_704_196_800_000}, "1")
        status, info, _ = sim.get("/fapi/v1/exchangeInfo")
        assert len(info["symbols"]) == 20
        rows = sim.get("/fapi/v1/klines?symbol=SYN007USDT&interval=1h&limit=3")[1]
        assert rows[-1][0] == 1_704_196_800_000 and rows[-1][6] > 1_704_196_800_000
        assert sim.post("/_sim/clock", {"advance_s": 3600})["now_ms"] == 1_704_200_400_000
        rows2 = sim.get("/fapi/v1/klines?symbol=SYN007USDT&interval=1h&limit=3")[1]
        assert rows2[-2][0] == rows[-1][0] and rows2[-2][1] == rows[-1][1]  # the forming bar closed, same open
        assert sim.get("/fapi/v1/klines?symbol=NOPEUSDT&interval=1h")[:2] == (400, {"code": -1121, "msg": "Invalid symbol."})
        # the same seed gives the same market in-process
        ref = synthetic_market(8, 3, seed=7).series("SYN007USDT", "1h")
        i = int(np.searchsorted(ref.open_time, rows2[0][0]))
        assert [float(r[4]) for r in rows2[:-1]] == pytest.approx(ref.close[i:i + 2].tolist(), rel=1e-12)
    finally:
        code = sim.stop()
    assert code == 0


def test_command_replays_real_data_with_faults():
    data = shared_data_dir()
    if data is None: pytest.skip("shared data folder not found")
    sim = SimProcess("--data", str(data / "klines_15m.parquet"), "--symbols", "BTCUSDT,ETHUSDT", "--speed", "60",
                     "--weight-limit", "100", "--error-rate", "1")
    try:
        assert sim.get("/fapi/v1/ping")[:2] == (503, {"code": -1001, "msg": "Internal error; unable to process your request. "
                                                                        "Please try again."})
        sim.post("/_sim/faults", {"error_rate": 0})
        t0 = sim.get("/fapi/v1/time")[1]["serverTime"]
        rows = sim.get("/fapi/v1/klines?symbol=BTCUSDT&interval=1h&limit=24")[1]
        deadline = time.monotonic() + 10        # the clock runs at 60x: 27 simulated seconds take about half a real one
        while sim.get("/fapi/v1/time")[1]["serverTime"] - t0 < 27_000:   # polled gently: the weight limit is 100
            assert time.monotonic() < deadline, "the simulated clock did not advance at --speed 60"
            time.sleep(0.05)
        ref = load_parquet_market(data / "klines_15m.parquet", symbols=["BTCUSDT"]).series("BTCUSDT", "1h")
        i = int(np.searchsorted(ref.open_time, rows[0][0]))
        assert [float(r[2]) for r in rows[:-1]] == ref.high[i:i + 23].tolist()
        status, body, headers = sim.get("/fapi/v1/ticker/24hr")  # weight 40 of a 100 limit
        assert status == 200 and {t["symbol"] for t in body} == {"BTCUSDT", "ETHUSDT"}
        codes = [sim.get("/fapi/v1/ticker/24hr")[0] for _ in range(5)]
        assert 429 in codes or 418 in codes
    finally:
        code = sim.stop()
    assert code == 0


@pytest.mark.parametrize("args, code, words", [
    (["--data", "/nonexistent/klines.parquet"], 2, "data error: /nonexistent/klines.parquet: no such kline file"),
    (["--synthetic", "3", "--days", "1", "--speed", "0"], 2, "usage error: tradelab sim: argument --speed: must be above zero"),
    (["--synthetic", "3", "--days", "1", "--error-rate", "1.5"], 2, "faults.error_rate must be in [0, 1]"),
    (["--synthetic", "3", "--start", "soon"], 2, "--start: 'soon'"),
])
def test_command_refuses_bad_arguments(args, code, words):
    done = subprocess.run([TRADELAB, "sim", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == code and words in done.stderr, done.stderr
