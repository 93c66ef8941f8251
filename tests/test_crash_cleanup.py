"""A `tradelab run` killed with SIGKILL leaves no process and no shared memory behind.

Real processes: `tradelab sim` (a synthetic market over HTTP) and `tradelab run` (the headless bot, two pool
workers, every batch through shared memory). Each bot starts in a new session, so the processes of one run (the
main process, its resource tracker, the forkserver and the pool workers) are the processes of that session, and the
shared memory and semaphores of the run are the `/dev/shm` files those processes map (read from `/proc/<pid>/maps`,
whatever they are named).
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from processes import bot_env, kill_session, sim_json, sim_process, start_bot, wait_for

SEED, N_SYMBOLS = 5, 20
SHM = Path("/dev/shm")

pytestmark = pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/maps").exists(), reason="needs /dev/shm and /proc")


@pytest.fixture(scope="module")
def sim():
    with sim_process(N_SYMBOLS, SEED) as url:
        sim_json(f"{url}/_sim/clock")  # it answers before any bot starts
        yield url


def _start_bot(url: str, home: Path, log_file: Path) -> subprocess.Popen:
    "A bot whose two pool workers analyse every batch (none in-process); retries, confidence and risk at their defaults."
    env = bot_env(url, N_SYMBOLS, BOT__SCAN_INTERVAL_S="1", POOL__WORKERS="2", POOL__IN_PROCESS_BELOW="0",
                  EXCHANGE__MAX_RETRIES=None, STRATEGY__MIN_CONFIDENCE=None, TRADING__RISK_PER_TRADE=None)
    return start_bot(env, home, log_file)


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

    return wait_for(up, 45, "the bot's pool workers to map a shared batch", poll_s=0.1)


def _left(files: set[str]) -> set[str]:
    return {n for n in files if (SHM / n).exists()}


def _stop(bot: subprocess.Popen, files: set[str]) -> None:
    "SIGTERM: an orderly exit, with no process of the run and none of its files `files` left."
    bot.send_signal(signal.SIGTERM)
    assert bot.wait(timeout=30) == 0
    wait_for(lambda: not _members(bot.pid), 5, "the stopped run's processes to exit")
    wait_for(lambda: not _left(files), 5, "the stopped run's block and semaphores to be removed")


def _tidy(bot: subprocess.Popen, files: set[str]) -> None:
    "After a failure: no process or file of the run outlives the test."
    kill_session(bot)
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
            wait_for(lambda: not _members(bot.pid), 5, "the run's processes to exit")
        survivors = _members(bot.pid)
        assert not survivors, f"alive {time.monotonic() - killed:.1f} s after the kill: {survivors}"
        wait_for(lambda: not _left(files), 5, "the run's resource tracker to remove its block and semaphores")
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
        wait_for(lambda: not _members(bot.pid), 5, "the run's processes to exit")
        left = _left(files)
        assert any(not n.startswith("sem.") for n in left) and any(n.startswith("sem.") for n in left)
        _restart(sim, home, tmp_path / "second.log", files)
        [line] = _sweep_lines(tmp_path / "second.log", bot.pid)
        assert "1 shared-memory block" in line and f"{sum(n.startswith('sem.') for n in left)} semaphores" in line
    finally:
        _tidy(bot, files)
