"""The simulator trades, as outside clients see it: signed requests over HTTP, order rate limits, order faults,
ccxt's binanceusdm, and `tradelab sim` opening an account."""
import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import ccxt
import numpy as np
import pytest

from tradelab.clock import SimClock, TestClock
from tradelab.exchange.signing import Credentials
from tradelab.sim.server import SimServer
from tradelab.sim.signed import OrderLimits
from tradelab.sim.synthetic import synthetic_market

sys.path.insert(0, str(Path(__file__).parent))
from test_sim import TRADELAB, SimProcess, ccxt_client  # noqa: E402  the same process and ccxt helpers as the market-data tests

MARKET = synthetic_market(3, 2, seed=1)
SYM = "SYN001USDT"


class Signed:
    "Signed requests to a running simulator with tradelab's own `Credentials`, over aiohttp."

    def __init__(self, sim: SimServer, http: aiohttp.ClientSession, key: str, secret: str):
        self.sim, self.http, self.creds = sim, http, Credentials(key, secret)

    async def raw(self, method, path, query, headers=None, body=None, timeout=None):
        url = self.sim.url + path + (f"?{query}" if query else "")
        async with self.http.request(method, url, headers=headers if headers is not None else self.creds.headers, data=body,
                                     timeout=timeout) as r:
            return r.status, await r.json(content_type=None), r.headers

    async def __call__(self, method, path, timeout=None, **params):
        query = self.creds.signed_query(params, self.sim.clock.now_ms())
        return await self.raw(method, path, query, timeout=timeout)


async def _session(clock=None, **kw):
    sim = await SimServer(MARKET, clock or TestClock(MARKET.default_start_ms()), **kw).start()
    key, secret = sim.open_account(10_000)
    http = aiohttp.ClientSession()
    return sim, http, Signed(sim, http, key, secret), key, secret


def _qty(sim, notional=50.0):
    "A quantity worth about `notional` USDT now, on the contract's step."
    price = float(sim.replay.last_price(SYM, sim.clock.now_ms())[0])
    return str(int(round(notional / price)))


async def _auth_errors():
    sim, http, call, key, secret = await _session()
    try:
        now = sim.clock.now_ms()
        good = call.creds.signed_query({"symbol": SYM}, now)
        bad_secret = Credentials(key, "wrong").signed_query({"symbol": SYM}, now)
        old = call.creds.signed_query({"symbol": SYM}, now - 6_000)
        ahead = call.creds.signed_query({"symbol": SYM}, now + 2_000)
        wide = call.creds.signed_query({"symbol": SYM}, now, recv_window_ms=90_000)
        window_ok = call.creds.signed_query({"symbol": SYM}, now - 6_000, recv_window_ms=10_000)
        seen = {
            "ok": await call.raw("GET", "/fapi/v2/positionRisk", good),
            "no key": await call.raw("GET", "/fapi/v2/positionRisk", good, headers={}),
            "unknown key": await call.raw("GET", "/fapi/v2/positionRisk", good, headers={"X-MBX-APIKEY": "nobody"}),
            "bad signature": await call.raw("GET", "/fapi/v2/positionRisk", bad_secret),
            "unsigned": await call.raw("GET", "/fapi/v2/positionRisk", good.rpartition("&signature=")[0]),
            "old": await call.raw("GET", "/fapi/v2/positionRisk", old),
            "ahead": await call.raw("GET", "/fapi/v2/positionRisk", ahead),
            "wide window": await call.raw("GET", "/fapi/v2/positionRisk", wide),
            "old in its window": await call.raw("GET", "/fapi/v2/positionRisk", window_ok),
        }
        # ccxt's way: a POST's parameters, signature included, in a form body
        form = call.creds.signed_query({"symbol": SYM, "leverage": 7}, now)
        seen["form body"] = await call.raw("POST", "/fapi/v1/leverage", "", body=form,
                                           headers=call.creds.headers | {"Content-Type": "application/x-www-form-urlencoded"})
        return seen, sim.stats()
    finally:
        await http.close()
        await sim.stop()


def test_signature_timestamp_and_key_refusals_over_http():
    seen, stats = asyncio.run(_auth_errors())
    codes = {k: (s, b.get("code") if isinstance(b, dict) else None) for k, (s, b, _) in seen.items()}
    assert codes == {
        "ok": (200, None), "no key": (401, -2014), "unknown key": (401, -2015), "bad signature": (400, -1022),
        "unsigned": (400, -1102), "old": (400, -1021), "ahead": (400, -1021), "wide window": (400, -1130),
        "old in its window": (200, None), "form body": (200, None),
    }
    assert seen["old"][1]["msg"] == "Timestamp for this request is outside of the recvWindow."
    assert seen["ahead"][1]["msg"] == "Timestamp for this request was 1000ms ahead of the server's time."
    assert seen["bad signature"][1]["msg"] == "Signature for this request is not valid."
    assert seen["form body"][1] == {"leverage": 7, "maxNotionalValue": "1000000", "symbol": SYM}
    assert stats["endpoints"]["/fapi/v2/positionRisk"]["weight"] == 9 * 5  # every request paid its weight


async def _rate_limits():
    sim, http, call, key, _ = await _session(order_limits=OrderLimits(per_10s=3, per_minute=5))
    try:
        price = float(sim.replay.last_price(SYM, sim.clock.now_ms())[0])
        limit = dict(symbol=SYM, side="BUY", type="LIMIT", timeInForce="GTC", quantity=_qty(sim, 20), price=f"{price * 0.5:.6f}")
        seen = [await call("POST", "/fapi/v1/order", **limit) for _ in range(4)]
        sim.clock.advance(10)
        seen += [await call("POST", "/fapi/v1/order", **limit) for _ in range(3)]
        sim.clock.advance(60)
        seen.append(await call("POST", "/fapi/v1/order", **limit))
        return seen, len(sim.exchange.open_orders(key))
    finally:
        await http.close()
        await sim.stop()


def test_order_rate_limits_per_10_seconds_and_per_minute():
    seen, placed = asyncio.run(_rate_limits())
    got = [(s, h["X-MBX-ORDER-COUNT-10S"], h["X-MBX-ORDER-COUNT-1M"]) for s, _, h in seen]
    assert got == [(200, "1", "1"), (200, "2", "2"), (200, "3", "3"), (429, "3", "3"),
                   (200, "1", "4"), (200, "2", "5"), (429, "2", "5"), (200, "1", "1")]
    assert seen[3][1] == {"code": -1015, "msg": "Too many new orders; current limit is 3 orders per TEN_SECONDS."}
    assert seen[6][1] == {"code": -1015, "msg": "Too many new orders; current limit is 5 orders per MINUTE."}
    assert placed == 6  # refused orders were not placed


async def _fault(kind, path):
    sim, http, call, key, _ = await _session()
    sim.faults.timeout_s = 2.0
    try:
        sim.inject_order_fault(kind, path)
        q = _qty(sim)
        if path == "/fapi/v1/order":
            place = dict(symbol=SYM, side="BUY", type="MARKET", quantity=q, newClientOrderId="f-1")
        else:
            price = float(sim.replay.last_price(SYM, sim.clock.now_ms())[0])
            place = dict(symbol=SYM, side="SELL", type="STOP_MARKET", algoType="CONDITIONAL", quantity=q,
                         triggerPrice=f"{price * 0.5:.6f}", clientAlgoId="f-1")
        try:
            answer = await call("POST", path, timeout=aiohttp.ClientTimeout(total=0.5), **place)
        except TimeoutError:
            answer = "client timeout"
        if path == "/fapi/v1/order":
            found = await call("GET", path, symbol=SYM, origClientOrderId="f-1")
        else:
            found = await call("GET", path, clientAlgoId="f-1")
        again = await call("POST", path, **place)  # the retry a careless client would send
        return answer, found, again, sim.exchange.positions(key), sim.exchange.open_algo_orders(key)
    finally:
        await http.close()
        await sim.stop()


@pytest.mark.parametrize("path", ["/fapi/v1/order", "/fapi/v1/algoOrder"])
@pytest.mark.parametrize("kind", ["accept_then_timeout", "accept_then_drop", "reject_5xx"])
def test_order_faults(kind, path):
    answer, found, again, positions, algos = asyncio.run(_fault(kind, path))
    placed = kind != "reject_5xx"
    if kind == "accept_then_drop":
        assert answer == "client timeout"
    else:
        assert answer[:2] == (503, {"code": -1007, "msg": "Timeout waiting for response from backend server. "
                                                           "Send status unknown; execution status unknown."})
    assert found[0] == (200 if placed else 400)
    if placed:  # the client finds the order and its retry is refused as a duplicate: one order, never two
        assert again[:2] == (400, {"code": -4116, "msg": "ClientOrderId is duplicated."})
    else:
        assert found[1]["code"] == -2013 and again[0] == 200
    if path == "/fapi/v1/order":
        assert len(positions) == 1
    else:
        assert [a["clientAlgoId"] for a in algos] == ["f-1"]


async def _keeps_up():
    "A stop fires while nobody asks: the clock runs at 600x and only the engine's own task advances it."
    start = MARKET.default_start_ms()
    sim, http, call, key, _ = await _session(clock=SimClock(start, speed=600))
    try:
        q = _qty(sim, 200)
        await call("POST", "/fapi/v1/order", symbol=SYM, side="BUY", type="MARKET", quantity=q)
        price = float(sim.replay.last_price(SYM, sim.clock.now_ms())[0])
        b = MARKET.series(SYM)
        i = int(np.searchsorted(b.open_time, sim.clock.now_ms()))
        low = float(b.low[i:i + 120].min())  # the next two hours
        trigger = f"{(price + low) / 2:.7f}"
        status, algo, _ = await call("POST", "/fapi/v1/algoOrder", symbol=SYM, side="SELL", type="STOP_MARKET",
                                     algoType="CONDITIONAL", triggerPrice=trigger, closePosition="true")
        assert status == 200, algo
        a = sim.exchange.algos[algo["algoId"]]
        deadline = time.monotonic() + 30
        while a.status == "NEW":
            assert time.monotonic() < deadline, "the stop did not fire within two simulated hours"
            await asyncio.sleep(0.05)
        return a, sim.exchange.positions(key), float(trigger)
    finally:
        await http.close()
        await sim.stop()


def test_the_engine_keeps_up_with_the_clock_between_requests():
    a, positions, trigger = asyncio.run(_keeps_up())
    assert a.status == "FINISHED" and positions == []
    assert a.actual_price <= trigger  # a stop fills at its trigger or worse, never better


async def _ccxt():
    sim, http, call, key, secret = await _session(clock=SimClock(MARKET.default_start_ms()))
    await http.close()
    try:
        ex = ccxt_client(sim.url)
        ex.apiKey, ex.secret = key, secret
        ex.options["adjustForTimeDifference"] = True  # the simulated clock is in the past: ccxt asks it the time
        sym = "SYN001/USDT:USDT"

        def trade():
            ex.load_time_difference()
            ex.load_markets()
            price = ex.fetch_ticker(sym)["last"]
            amount = float(ex.amount_to_precision(sym, 60 / price))
            bought = ex.create_order(sym, "market", "buy", amount)
            resting = ex.create_order(sym, "limit", "buy", amount, float(ex.price_to_precision(sym, price * 0.8)))
            listed = ex.fetch_open_orders(sym)
            cancelled = ex.cancel_order(resting["id"], sym)
            try:
                ex.create_order(sym, "market", "buy", amount * 1e4)
                refused = None
            except ccxt.BaseError as e:
                refused = e
            return amount, bought, resting, listed, cancelled, ex.fetch_positions([sym]), ex.fetch_balance(), refused

        out = await asyncio.to_thread(trade)
        return out, sim.exchange.positions(key), sim.exchange.balance(key), sim.exchange.open_orders(key)
    finally:
        await sim.stop()


def test_ccxt_binanceusdm_places_and_cancels_orders_and_reads_positions_and_balance():
    (amount, bought, resting, listed, cancelled, positions, balance, refused), rows, wallet, still_open = asyncio.run(_ccxt())
    assert bought["status"] == "closed" and bought["filled"] == amount and bought["average"] > 0
    assert resting["status"] == "open" and [o["id"] for o in listed] == [resting["id"]]
    assert cancelled["status"] == "canceled" and still_open == []
    (pos,) = [p for p in positions if p["contracts"]]
    assert pos["side"] == "long" and pos["contracts"] == amount == float(rows[0]["positionAmt"])
    assert pos["entryPrice"] == pytest.approx(bought["average"])
    assert balance["USDT"]["total"] == pytest.approx(wallet)
    assert wallet == pytest.approx(10_000 - bought["cost"] * 0.0005)  # the taker commission
    assert isinstance(refused, ccxt.ExchangeError) and '"code": -2019' in str(refused)  # margin is insufficient


def _signed_get(url, path, key, secret, now, **params):
    query = Credentials(key, secret).signed_query(params, now)
    req = urllib.request.Request(f"{url}{path}?{query}", headers={"X-MBX-APIKEY": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_command_opens_the_account_it_is_given_and_generates_one_otherwise():
    start = "2024-01-02T12:00"
    given = SimProcess("--synthetic", "3", "--days", "2", "--stepped", "--start", start,
                       "--api-key", "k" * 64, "--api-secret", "s" * 64, "--balance", "2500")
    try:
        now = given.get("/fapi/v1/time")[1]["serverTime"]
        status, rows = _signed_get(given.url, "/fapi/v2/balance", "k" * 64, "s" * 64, now)
        assert status == 200 and rows[0]["balance"] == "2500.00000000"
        assert _signed_get(given.url, "/fapi/v2/balance", "k" * 64, "x" * 64, now)[1]["code"] == -1022
        line = given.proc.stdout.readline()
        assert "given API key" in line and "s" * 64 not in line  # a secret it was given is never printed
    finally:
        assert given.stop() == 0
    generated = SimProcess("--synthetic", "3", "--days", "2", "--stepped", "--start", start)
    try:
        line = generated.proc.stdout.readline()
        key, secret = line.split("api key ")[1].split(" api secret ")
        now = generated.get("/fapi/v1/time")[1]["serverTime"]
        status, rows = _signed_get(generated.url, "/fapi/v2/balance", key, secret.strip(), now)
        assert status == 200 and rows[0]["balance"] == "10000.00000000"
        opened = generated.post("/_sim/account", {"balance": 50})
        rows = _signed_get(generated.url, "/fapi/v2/balance", opened["api_key"], opened["api_secret"], now)[1]
        assert rows[0]["balance"] == "50.00000000"
    finally:
        assert generated.stop() == 0


def test_hmac_is_binances():
    "The signature the simulator checks is Binance's documented example (HMAC-SHA256 of the query string)."
    secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
    query = ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
             "&timestamp=1499827319559")
    assert hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest() == \
        "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


@pytest.mark.parametrize("args, words", [
    (["--api-key", "k" * 64], "--api-key and --api-secret go together"),
    (["--api-secret", "s" * 64], "--api-key and --api-secret go together"),
    (["--slippage", "0.5"], "--slippage must be in [0, 0.1)"),
    (["--fill-delay-ms", "-5"], "--fill-delay-ms >= 0"),
    (["--balance", "-1"], "--balance"),
    (["--taker-fee", "0.05"], "--taker-fee must be in [-0.001, 0.01)"),
])
def test_command_refuses_bad_account_arguments(args, words):
    done = subprocess.run([TRADELAB, "sim", "--synthetic", "2", "--days", "1", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
