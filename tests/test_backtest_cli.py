"""`tradelab backtest` and `tradelab tune` as a user runs them: installed commands, a kline file, JSON out.

The tuning run is the acceptance check of the tuner: eight trials per fold on a Dask LocalCluster of two
worker processes, and out-of-sample figures for every fold beside the defaults' on the same window.
"""
import json
import os
import subprocess

import pytest

from processes import command
from tradelab.backtest.history import market_frame
from tradelab.sim.synthetic import synthetic_market

TIMEFRAMES = {"TRADELAB_DATA__TIMEFRAMES": '["1h", "15m", "5m"]', "TRADELAB_STRATEGY__MIN_CONFIDENCE": "0.45"}


@pytest.fixture(scope="module")
def klines(tmp_path_factory):
    "Five-minute bars of a 16-day synthetic market, as a kline file in the shared data's schema."
    m = synthetic_market(12, 16, seed=4)
    path = tmp_path_factory.mktemp("data") / "k5.parquet"
    market_frame(m, "5m").to_parquet(path)
    return path


def _run(*args, timeout=300):
    out = subprocess.run([command("tradelab"), *args, "--log-level", "ERROR"], capture_output=True, text=True, timeout=timeout,
                         env={k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | TIMEFRAMES)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_backtest_json_is_the_same_twice_and_writes_its_report(klines, tmp_path):
    first = json.loads(_run("backtest", "--data", str(klines), "--json", "--out", str(tmp_path / "a")))
    second = json.loads(_run("backtest", "--data", str(klines), "--json"))
    for book in ("real", "virtual"):
        assert first[book] == second[book]
    assert first["virtual"]["trades"] > 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"report.json", "archive.sqlite", "trades.parquet", "report.html"}


def test_tune_reports_out_of_sample_figures_per_fold_on_a_two_worker_cluster(klines, tmp_path):
    s = json.loads(_run("tune", "--data", str(klines), "--trials", "8", "--folds", "2", "--workers", "2", "--json",
                        "--out", str(tmp_path / "tuned")))
    assert (s["workers"], s["scheduler"], len(s["folds"])) == (2, "LocalCluster", 2)
    for f in s["folds"]:
        assert f["trials"] == 8 and f["train_window"][1] < f["test_window"][0]
        assert f["default_test"]["virtual"]["trades"] > 0
        assert f["test"] is None or "objective_r" in f["test"]
    assert (tmp_path / "tuned" / "summary.json").exists()
