"""Every wrong input a newcomer is likely to type gets one line naming the problem and exit status 2, no traceback.

Usage mistakes are labelled "usage error", settings "configuration error", files "data error"; `--help` and
`--version` answer at every level with status 0. Commands that start something (demo, sim, run) run as the installed
`tradelab` in a process of their own, as a user would; the others through `tradelab.cli.main` in this process, the
same entry point, which is faster.
"""
import contextlib
import io
import os
import re
import subprocess

import pandas as pd
import pytest

from processes import command
from tradelab.cli import main
from tradelab.sim.synthetic import synthetic_market


def tradelab(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([command("tradelab"), *args], capture_output=True, text=True, timeout=timeout, env=clean)


def in_process(*args: str) -> subprocess.CompletedProcess:
    "`tradelab.cli.main(args)` here, its status and what it wrote, as a finished process would show them."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args), env={})
    return subprocess.CompletedProcess(["tradelab", *args], code, out.getvalue(), err.getvalue())


def one_line(r: subprocess.CompletedProcess, label: str, *words: str) -> str:
    "The single stderr line of a refused command: status 2, `label`, each of `words`, no traceback."
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"tradelab: {label}: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "A 15m kline file (3 synthetic symbols, 4 days), a CSV named .parquet, and a truncated Parquet file."
    d = tmp_path_factory.mktemp("inputs")
    m = synthetic_market(3, 4, seed=3)
    k15 = pd.concat([m.series(s, "15m").klines().to_frame().assign(symbol=s) for s in m.symbols])
    k15.to_parquet(d / "k15.parquet", index=False)
    (d / "notes.parquet").write_text("symbol,open_time\nBTCUSDT,0\n")
    (d / "cut.parquet").write_bytes((d / "k15.parquet").read_bytes()[:400])
    (d / "fast.toml").write_text('[data]\ntimeframes = ["1h", "15m", "5m"]\n')
    return d


def test_help_and_version_answer_at_every_level():
    for args in (["--help"], [], ["demo", "--help"], ["bench", "backtest", "--help"]):
        r = tradelab(*args)
        assert r.returncode == 0 and "usage: tradelab" in r.stdout and not r.stderr.strip(), (args, r.stdout, r.stderr)
    r = tradelab("--version")
    assert r.returncode == 0 and r.stdout.startswith("tradelab ") and r.stdout.split()[1][0].isdigit(), r.stdout


def test_an_unknown_command_option_or_benchmark_is_a_usage_error():
    one_line(tradelab("frobnicate"), "usage error", "unknown command 'frobnicate'", "commands: lab, docs, config, bench")
    one_line(in_process("bench", "nothing"), "usage error", "unknown benchmark 'nothing'", "backtest")
    one_line(in_process("demo", "--nope"), "usage error", "tradelab demo: unrecognized arguments: --nope", "--help")
    one_line(in_process("backtest"), "usage error", "--data")


@pytest.mark.parametrize("args, words", [
    (["demo", "--hours", "-1"], ["--hours", "above zero", "-1"]),
    (["demo", "--speed", "0"], ["--speed", "above zero"]),
    (["demo", "--symbols", "0"], ["--symbols", "above zero"]),
    (["sim", "--synthetic", "5", "--days", "0"], ["--days", "above zero"]),
    (["tune", "--data", "x.parquet", "--trials", "0"], ["--trials", "above zero"]),
    (["backtest", "--data", "x.parquet", "--top", "-3"], ["--top", "above zero"]),
    (["demo", "--hours", "nan"], ["--hours", "above zero"]),
])
def test_durations_and_counts_must_be_positive(args, words):
    one_line(in_process(*args), "usage error", *words)


def test_a_file_that_is_not_parquet_is_named(files):
    for bad in ("notes.parquet", "cut.parquet"):
        one_line(in_process("backtest", "--data", str(files / bad)), "data error", bad, "not a readable Parquet")
        one_line(tradelab("sim", "--data", str(files / bad)), "data error", bad, "not a readable Parquet")
        one_line(tradelab("demo", "--data", str(files / bad)), "data error", bad, "not a readable Parquet")
    one_line(in_process("backtest", "--data", str(files / "absent.parquet")), "data error", "absent.parquet", "no such")


def test_data_that_cannot_serve_the_timeframes_names_both(files):
    k15 = str(files / "k15.parquet")
    one_line(in_process("backtest", "--data", k15, "--config", str(files / "fast.toml")), "data error",
             "15m bars cannot make the 5m timeframe(s) of data.timeframes")
    one_line(tradelab("demo", "--data", k15, "--hours", "1"), "configuration error",
             "its 15m bars cannot serve data.timeframes ['5m', '1m']", "it serves 15m, 30m, 1h")


def test_a_bad_setting_is_a_configuration_error(files):
    (files / "bad.toml").write_text("[trading]\nmax_trades = -1\n")
    one_line(in_process("config", "show", "--config", str(files / "bad.toml")), "configuration error", "max_trades")
    one_line(in_process("backtest", "--data", str(files / "k15.parquet"), "--strategy", "no_such"), "configuration error",
             "no_such")


def test_run_against_an_exchange_that_cannot_serve_a_timeframe_stops_at_start(files, tmp_path):
    "`tradelab sim --data` on 15m bars and `tradelab run` with 5m in its timeframes: one line, status 2, not a silent loop."
    sim = subprocess.Popen([command("tradelab"), "sim", "--data", str(files / "k15.parquet"), "--speed", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = next(m.group(0) for line in sim.stdout if (m := re.search(r"http://[0-9.]+:[0-9]+", line)))
        r = tradelab("run", "--home", str(tmp_path / "home"), "--config", str(files / "fast.toml"), "--log-level", "WARNING",
                     env={"TRADELAB_EXCHANGE__BASE_URL": url}, timeout=60)
    finally:
        sim.terminate()
        sim.wait(10)
    one_line(r, "configuration error", "data.timeframes ['1h', '15m', '5m']", "refuses 5m klines")
