"""The whole market by default: `tradelab run` with default settings scans every symbol the exchange lists.

A 500-symbol synthetic market (about Binance's USDⓈ-M count) served by `tradelab sim` in real time; the bot with no
setting but the exchange's address. Its first fill (1,500 series, about 3,000 weight) must be paced under the
weight budget (80 % of 2,400 a minute): the simulator's weight header never reaches the limit, no 429 or 418, and
the first scan analyses all 500 symbols. It takes a minute or two of real time, as it would against Binance.
"""
import os
import re

from processes import kill_session, sigterm_and_time, sim_json, sim_process, start_bot, wait_for

SYMBOLS = 500
SCAN = re.compile(r"scan cycle (\d+): .*?symbols (\d+)")


def test_default_settings_scan_every_symbol_under_the_weight_budget(tmp_path):
    with sim_process(SYMBOLS, 3) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADELAB_")} | {"TRADELAB_EXCHANGE__BASE_URL": url}
        log_file = tmp_path / "bot.log"
        bot = start_bot(env, tmp_path / "home", log_file)
        try:
            first = wait_for(lambda: SCAN.search(log_file.read_text()), 300, "the first scan's heartbeat")
            text = log_file.read_text()
            stats = sim_json(f"{url}/_sim/stats")
            _, code = sigterm_and_time(bot)
        except BaseException:
            kill_session(bot)
            raise
    assert int(first.group(2)) == SYMBOLS, first.group(0)
    assert "universe: 500 symbols, every TRADING perpetual" in text
    assert re.search(r"1500 series to come, paced under the weight budget", text), text[-3000:]
    assert stats["status_429"] == 0 and stats["status_418"] == 0
    assert stats["max_used_weight_1m"] <= 2400 * 0.8 + 40, stats["max_used_weight_1m"]  # the budget, and a request in flight
    assert code == 0
