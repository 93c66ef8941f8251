"""Exhaustive checks of the analysis layer on many random markets.

The notebooks show each rule on a few series; here the same properties are checked over many seeds:
the mirror symmetry of signals, left padding that changes nothing, rows of a batch that do not
influence each other, and the vectorised structure against a bar-by-bar specification.
"""
import numpy as np
import pytest

from tradelab.config import StrategySettings
from tradelab.analysis.features import MIRROR_EXACT, build_features, measure, mirror_batch, mirror_features
from tradelab.sim.generators import random_batch, random_walk
from tradelab.analysis.indicators import adx, atr, bollinger, ema, macd, rsi, volume_ratio
from tradelab.records import Side
from tradelab.analysis.strategy import analyze_batch
from tradelab.analysis.structure import market_structure, nearest_blocks, order_blocks, swings

ANY = StrategySettings(min_confidence=0.0)


@pytest.mark.parametrize("seed", range(8))
def test_mirrored_market_gives_mirrored_signals(seed):
    b = random_batch(40, 120, seed=100 + seed)
    p0 = np.nanmax(np.stack([np.nanmax(f.high, axis=1) for f in b.frames.values()]), axis=0)
    a = {x.symbol: x for x in analyze_batch(b, ANY)}
    z = {x.symbol: x for x in analyze_batch(mirror_batch(b), ANY)}
    assert a and sorted(a) == sorted(z)
    for sym, x in a.items():
        y, q = z[sym], p0[b.symbols.index(sym)]
        assert y.side == Side(-int(x.side))
        assert y.confidence == pytest.approx(x.confidence, rel=1e-9)
        assert [y.entry, y.stop, y.target] == pytest.approx([2 * q - x.entry, 2 * q - x.stop, 2 * q - x.target], rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mirrored_features(seed):
    b = random_batch(30, 150, seed=200 + seed)
    m, mm = measure(b), measure(mirror_batch(b))
    np.testing.assert_allclose(mm.values[:, MIRROR_EXACT], mirror_features(m.values)[:, MIRROR_EXACT], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_left_padding_changes_nothing(seed):
    h, lo, c, v = random_walk(3, 300, seed)
    k = 37 + 20 * seed
    H, L, C, V = (np.vstack([a[0], np.r_[np.full(k, np.nan), a[1, k:]], a[2]]) for a in (h, lo, c, v))
    one = (h[1, k:], lo[1, k:], c[1, k:], v[1, k:])
    pairs = [(ema(C, 20)[1], ema(one[2], 20)), (rsi(C)[1], rsi(one[2])), (atr(H, L, C)[1], atr(*one[:3])),
             (macd(C)[2][1], macd(one[2])[2]), (bollinger(C)[3][1], bollinger(one[2])[3]),
             (adx(H, L, C)[0][1], adx(*one[:3])[0]), (volume_ratio(V)[1], volume_ratio(one[3]))]
    for padded, alone in pairs:
        assert np.isnan(padded[:k]).all()
        np.testing.assert_allclose(padded[k:], alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_rows_do_not_influence_each_other(seed):
    b = random_batch(24, 120, seed=300 + seed)
    X = build_features(b)
    idx = np.random.default_rng(seed).choice(24, 7, replace=False)
    np.testing.assert_array_equal(build_features(b.take(idx)), X[idx])


def _structure_by_bar(h, lo, c, window):
    "The break rules one bar at a time: the specification the vectorised version must meet."
    sh, sl = swings(h, lo, window)
    hi = low = np.nan
    hi_live = lo_live = False
    trend, brk, trends = 0, np.zeros(len(c), np.int8), np.zeros(len(c), np.int8)
    for t in range(window, len(c)):
        if sh[t - window]: hi, hi_live = h[t - window], True
        if sl[t - window]: low, lo_live = lo[t - window], True
        above, below = c[t] > hi, c[t] < low
        d = 1 if hi_live and above and not below else -1 if lo_live and below and not above else 0
        if d > 0: hi_live = False
        if d < 0: lo_live = False
        brk[t], trend = d, d or trend
        trends[t] = trend
    return brk, trends


def _bull_blocks_by_bar(o, h, lo, c, brk, a, lookback, impulse):
    "The bullish order block rules one bar at a time."
    idx = np.full(len(c), -1)
    cur, bottom = -1, np.nan
    for t in range(len(c)):
        if brk[t] > 0:
            j = next((j for j in range(t - 1, -1, -1) if c[j] < o[j]), -1)
            if j >= 0 and t - j <= lookback and c[t] - h[j] >= impulse * a[t]:
                cur, bottom = j, lo[j]
        if cur >= 0 and c[t] < bottom: cur = -1
        idx[t] = cur
    return idx


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_structure_and_blocks_match_the_bar_by_bar_rules(window):
    h, lo, c, _ = random_walk(12, 500, seed=window)
    o = np.concatenate([c[:, :1], c[:, :-1]], axis=1)
    h, lo = np.maximum(h, np.maximum(o, c)), np.minimum(lo, np.minimum(o, c))
    a = atr(h, lo, c, 14)
    st = market_structure(h, lo, c, window)
    ob = order_blocks(o, h, lo, c, st, a, lookback=8, impulse_atr=0.5)
    for i in range(12):
        brk, trend = _structure_by_bar(h[i], lo[i], c[i], window)
        np.testing.assert_array_equal(st.breaks[i], brk)
        np.testing.assert_array_equal(st.trend[i], trend)
        np.testing.assert_array_equal(ob.bull_index[i], _bull_blocks_by_bar(o[i], h[i], lo[i], c[i], brk, a[i], 8, 0.5))
    assert (ob.bull_index >= 0).any() and (st.choch != 0).any()


def _nearest_bull_by_bar(o, h, lo, c, brk, a, lookback, impulse):
    "Every bullish block ever formed, kept while no close goes below it; the nearest at the end."
    active = []
    for t in range(len(c)):
        if brk[t] > 0:
            j = next((j for j in range(t - 1, -1, -1) if c[j] < o[j]), -1)
            if j >= 0 and t - j <= lookback and c[t] - h[j] >= impulse * a[t]: active.append((t, h[j], lo[j]))
        active = [b for b in active if c[t] >= b[2]]
    if not active: return np.nan, np.nan
    _, top, bottom = min(active, key=lambda b: (max(c[-1] - b[1], 0.0), -b[0]))
    return top, bottom


@pytest.mark.parametrize("seed", range(4))
def test_nearest_blocks_match_the_bar_by_bar_rules(seed):
    h, lo, c, _ = random_walk(20, 400, seed=50 + seed)
    o = np.concatenate([c[:, :1], c[:, :-1]], axis=1)
    h, lo = np.maximum(h, np.maximum(o, c)), np.minimum(lo, np.minimum(o, c))
    a = atr(h, lo, c, 14)
    st = market_structure(h, lo, c, 2)
    top, bottom, _, _ = nearest_blocks(o, h, lo, c, st, a, lookback=10, impulse_atr=0.5)
    for i in range(20):
        ref = _nearest_bull_by_bar(o[i], h[i], lo[i], c[i], st.breaks[i], a[i], 10, 0.5)
        np.testing.assert_array_equal([top[i], bottom[i]], ref)
    assert np.isfinite(top).sum() > 5
