"""A headless run as an operator sees it: `tradelab status`, the metrics endpoint, the notifications and the log file.

The installed `tradelab sim` and `tradelab run` run as child processes; the notification channel is a recording
HTTP endpoint on loopback (apprise `json://`), the metrics are scraped over HTTP on loopback.
"""
import json
import subprocess
import urllib.request
from pathlib import Path

from processes import bot_env, command, heartbeats, kill_session, sigterm_and_time, sim_process, start_bot, wait_for
from tradelab.sim.webhook import WebhookRecorder


def status(home: Path) -> tuple[int, dict]:
    "`tradelab status --home home --json`: its exit status and report."
    out = subprocess.run([command("tradelab"), "status", "--home", str(home), "--json"], capture_output=True, text=True,
                         timeout=60)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_a_run_reports_its_status_metrics_and_notifications_and_keeps_its_secrets(tmp_path):
    home, log_file = tmp_path / "home", tmp_path / "run.out"
    with WebhookRecorder() as hook, sim_process(5, seed=3) as url:
        secret_url = hook.url("hook?token=t0k3n-s3cr3t")
        env = bot_env(url, 5, METRICS__PORT="0", NOTIFY__URLS=secret_url, NOTIFY__BATCH_S="0.2", LOG__FORMAT="json")
        proc = start_bot(env, home, log_file)
        try:
            wait_for(lambda: heartbeats(log_file, "scan") >= 2, 120, "two scans")
            code, running = status(home)
            assert (code, running["verdict"]) == (0, "running"), running
            text = scrape(running["status"]["metrics_url"])
            assert 'tradelab_cycle_seconds_count{loop="scan"}' in text and "tradelab_requests_total" in text
            took, exit_code = sigterm_and_time(proc)
        except BaseException:
            kill_session(proc)
            raise
        wait_for(lambda: hook.messages() and hook.messages()[-1]["title"] == "tradelab: stopped", 10, "the stop's message")
        told = hook.messages()
    assert exit_code == 0 and told[0]["title"] == "tradelab: started", told[:2]
    code, stopped = status(home)
    assert (code, stopped["verdict"], stopped["status"]["state"]) == (1, "stopped", "STOPPED")
    assert stopped["books"]["breaker"] is None or stopped["books"]["breaker"]["level"] == "NORMAL"
    lines = [json.loads(x) for x in (home / "tradelab.log").read_text().splitlines()]
    assert any(x["logger"] == "tradelab.loops" and "scan cycle" in x["message"] for x in lines)
    for where in (home / "tradelab.log", home / "status.json", log_file):
        assert "t0k3n-s3cr3t" not in where.read_text(), where


def test_status_of_a_home_where_no_bot_ran_is_one_line(tmp_path):
    out = subprocess.run([command("tradelab"), "status", "--home", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"tradelab: configuration error: --home {tmp_path}: no tradelab bot has run "
                                               f"here (no status.json, no tradelab.sqlite)"]


def test_a_notification_url_apprise_cannot_use_stops_the_run_at_start_naming_only_its_scheme(tmp_path):
    env = bot_env("http://127.0.0.1:9", 5, NOTIFY__URLS="nosuchservice://s3cr3t-tok3n@example")
    out = subprocess.run([command("tradelab"), "run", "--home", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "notify.urls[0] nosuchservice://********: not a notification URL" in out.stderr
    assert "s3cr3t-tok3n" not in out.stderr + out.stdout
