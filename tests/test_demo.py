"""The demo a person can watch, and shutdowns a person can read.

`tradelab demo` runs in a process of its own as a user starts it: few console lines, a progress bar, the full log in
a file, and the same figures for the same seed. Ctrl-C is a SIGINT to the terminal's whole process group (the
command, its pool's workers, the forkserver): `run` and `demo` must end without a traceback from any of them.
"""
import json
import os
import signal
import subprocess

from processes import bot_env, command, heartbeats, kill_session, sim_process, wait_for

from tradelab.ops.status import STATUS_FILE

TIMING = ("wall_s", "stage_ms", "log_file")


def demo(*args: str, home=None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    return subprocess.run([command("tradelab"), "demo", "--hours", "0.5", "--symbols", "20", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_the_same_seed_gives_the_same_demo(tmp_path):
    runs = [demo("--json", "--seed", "7", "--log-file", str(tmp_path / f"{i}.log")) for i in (1, 2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = ({k: v for k, v in json.loads(r.stdout).items() if k not in TIMING} for r in runs)
    assert a == b
    assert a["scan_cycles"] == 30 and a["monitor_cycles"] == 180 and a["signals"] > 0  # every due cycle, each run
    other = json.loads(demo("--json", "--seed", "8", "--log-file", str(tmp_path / "3.log")).stdout)
    assert {k: v for k, v in other.items() if k not in TIMING} != a  # the seed matters


def test_the_console_shows_progress_and_few_lines_the_log_file_the_rest(tmp_path):
    r = demo("--log-file", str(tmp_path / "demo.log"))
    assert r.returncode == 0, r.stderr[-2000:]
    console = r.stdout.count("\n") + r.stderr.count("\n")
    assert console < 40, r.stdout + r.stderr
    assert "simulated min" in r.stderr and "30/30 simulated min" in r.stderr  # the bar reached the end
    assert "what each figure" not in r.stdout and "signals that passed the confidence floor" in r.stdout
    log = (tmp_path / "demo.log").read_text()
    assert heartbeats(tmp_path / "demo.log", "scan") == 30 and "bot stopped" in log
    assert f"full log: {tmp_path / 'demo.log'}" in r.stdout


def _interrupt(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[int, str, str]:
    "SIGINT to the whole process group, as Ctrl-C in a terminal: (exit status, stdout, stderr)."
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise
    return proc.returncode, out, err


def test_ctrl_c_ends_demo_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")}
    proc = subprocess.Popen([command("tradelab"), "demo", "--hours", "6", "--speed", "600", "--log-file", str(tmp_path / "d.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    wait_for(lambda: heartbeats(tmp_path / "d.log", "scan") >= 3 if (tmp_path / "d.log").exists() else False, 120,
             "three scans of the demo")
    code, _, err = _interrupt(proc)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert code == 130, (code, err[-2000:])


def _scanned(home) -> bool:
    "Whether the run's status file says a scan has ended (a busy machine may take a while to start)."
    try:
        return json.loads((home / STATUS_FILE).read_text())["last_cycles"]["scan"] is not None
    except (OSError, ValueError, KeyError):
        return False


def test_ctrl_c_ends_run_with_a_summary_and_without_a_traceback(tmp_path):
    with sim_process(12, 5) as url:
        proc = subprocess.Popen([command("tradelab"), "run", "--home", str(tmp_path / "home"), "--log-level", "WARNING"],
                                env=bot_env(url, 12), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        wait_for(lambda: _scanned(tmp_path / "home") or proc.poll() is not None, 180, "a finished scan")
        code, out, err = _interrupt(proc)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert code == 0, (code, err[-2000:])
    assert "scan cycles" in out and "pnl real" in out, out  # the closing summary
