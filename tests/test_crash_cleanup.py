"""A `tradelab run` killed with SIGKILL leaves no process and no shared memory behind.

Real processes: `tradelab sim` (a synthetic market over HTTP) and `tradelab run` (the headless bot, two pool
workers, every batch through shared memory). Each bot starts in a new session, so the processes of one run (the
main process, its resource tracker, the forkserver and the pool workers) are the processes of that session, and the
shared memory and semaphores of the run are the `/dev/shm` files those processes map (read from `/proc/<pid>/maps`,
whatever they are named).
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tradelab.sim.synthetic import synthetic_market

SEED, N_SYMBOLS, HISTORY_DAYS = 5, 20, 2
SHM = Path("/dev/shm")

pytestmark = pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/maps").exists(), reason="needs /dev/shm and /proc")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="module")
def sim():
    start = synthetic_market(1, 0.01, SEED).span_ms[0] + HISTORY_DAYS * 86_400_000
    proc = subprocess.Popen(
        [
            _bin("tradelab"),
            "sim",
            "--synthetic",
            str(N_SYMBOLS),
            "--seed",
            str(SEED),
            "--days",
            "3",
            "--start",
            str(start),
            "--speed",
            "1",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = re.search(r"at (http://\S+) with", proc.stdout.readline()).group(1)
        with urllib.request.urlopen(f"{url}/_sim/clock", timeout=5) as r:
            json.loads(r.read())
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _start_bot(url: str, home: Path, log_file: Path) -> subprocess.Popen:
    over = {
        "EXCHANGE__BASE_URL": url,
        "BOT__SCAN_INTERVAL_S": "1",
        "BOT__MONITOR_INTERVAL_S": "1",
        "DATA__TIMEFRAMES": '["15m", "5m", "1m"]',
        "DATA__LIMITS": '{"15m": 100, "5m": 100, "1m": 100}',
        "UNIVERSE__TOP_N": str(N_SYMBOLS),
        "POOL__WORKERS": "2",
        "POOL__IN_PROCESS_BELOW": "0",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    env |= {f"TRADELAB_{k}": v for k, v in over.items()}
    with open(log_file, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [_bin("tradelab"), "run", "--home", str(home), "--log-level", "INFO"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _members(sid: int) -> dict[int, str]:
    "The live processes of session `sid`, pid -> command line (a zombie holds no memory and no descriptor: left out)."
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _, _, session = (d / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and state != "Z":
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
    return out


def _mapped(pids) -> set[str]:
    "Names of the files in /dev/shm (shared-memory blocks and semaphores) that processes `pids` map."
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(None, 5)[5:]
                if path and path[0].startswith(f"{SHM}/") and not path[0].endswith(" (deleted)"):
                    names.add(path[0].removeprefix(f"{SHM}/"))
    return names


def _running_pool(bot: subprocess.Popen) -> tuple[dict[int, str], set[str]]:
    "Once the run's workers hold a batch in shared memory: its processes and the /dev/shm files they map."

    def up():
        members = _members(bot.pid)
        assert bot.poll() is None, "the bot exited"
        files = _mapped(members)
        blocks, sems = [n for n in files if not n.startswith("sem.")], [n for n in files if n.startswith("sem.")]
        return len(members) >= 5 and blocks and sems and (members, files)  # main, tracker, forkserver, 2 workers

    return _wait(up, 45, "the bot's pool workers to map a shared batch", poll_s=0.1)


def _left(files: set[str]) -> set[str]:
    return {n for n in files if (SHM / n).exists()}


def _stop(bot: subprocess.Popen, files: set[str]) -> None:
    "SIGTERM: an orderly exit, with no process of the run and none of its files `files` left."
    bot.send_signal(signal.SIGTERM)
    assert bot.wait(timeout=30) == 0
    _wait(lambda: not _members(bot.pid), 5, "the stopped run's processes to exit")
    _wait(lambda: not _left(files), 5, "the stopped run's block and semaphores to be removed")


def _tidy(bot: subprocess.Popen, files: set[str]) -> None:
    "After a failure: no process or file of the run outlives the test."
    with contextlib.suppress(ProcessLookupError):
        os.killpg(bot.pid, signal.SIGKILL)
    bot.wait(timeout=10)
    for n in files:
        with contextlib.suppress(FileNotFoundError):
            (SHM / n).unlink()


def _sweep_lines(log_file: Path, pid: int) -> list[str]:
    "The warning lines of a log that say what was removed of the run of process `pid`."
    return [ln for ln in log_file.read_text().splitlines() if " WARNING " in ln and f"process {pid}:" in ln]


def _restart(sim: str, home: Path, log_file: Path, files: set[str]) -> None:
    "A second run on the same home: once its pool works, nothing of the killed run is left; then an orderly stop."
    again = _start_bot(sim, home, log_file)
    mine: set[str] = set()
    try:
        _, mine = _running_pool(again)
        assert not _left(files), f"left in /dev/shm by the killed run: {sorted(_left(files))}"
        _stop(again, mine)
    finally:
        _tidy(again, mine)


def test_sigkill_of_the_main_process_ends_the_whole_run(sim, tmp_path):
    "Only the main process is killed: workers, forkserver and resource tracker follow it, and the tracker removes its files."
    home = tmp_path / "home"
    bot, files = _start_bot(sim, home, tmp_path / "first.log"), set()
    try:
        _, files = _running_pool(bot)
        os.kill(bot.pid, signal.SIGKILL)
        bot.wait(timeout=5)
        killed = time.monotonic()
        with contextlib.suppress(AssertionError):
            _wait(lambda: not _members(bot.pid), 5, "the run's processes to exit")
        survivors = _members(bot.pid)
        assert not survivors, f"alive {time.monotonic() - killed:.1f} s after the kill: {survivors}"
        _wait(lambda: not _left(files), 5, "the run's resource tracker to remove its block and semaphores")
        _restart(sim, home, tmp_path / "second.log", files)
        assert _sweep_lines(tmp_path / "second.log", bot.pid) == []  # nothing was left to sweep
    finally:
        _tidy(bot, files)


def test_a_run_killed_with_its_process_group_is_swept_at_the_next_start(sim, tmp_path):
    "Every process of the run is killed at once, its resource tracker too: the next start removes what it left, and says so."
    home = tmp_path / "home"
    bot, files = _start_bot(sim, home, tmp_path / "first.log"), set()
    try:
        _, files = _running_pool(bot)
        os.killpg(bot.pid, signal.SIGKILL)
        bot.wait(timeout=5)
        _wait(lambda: not _members(bot.pid), 5, "the run's processes to exit")
        left = _left(files)
        assert any(not n.startswith("sem.") for n in left) and any(n.startswith("sem.") for n in left)
        _restart(sim, home, tmp_path / "second.log", files)
        [line] = _sweep_lines(tmp_path / "second.log", bot.pid)
        assert "1 shared-memory block" in line and f"{sum(n.startswith('sem.') for n in left)} semaphores" in line
    finally:
        _tidy(bot, files)
