"""Process-level checks of the pool: real forkserver workers, real ONNX files, real kill -9."""
import asyncio
import os
import signal
import subprocess
import sys
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

from tradelab.config import load_settings
from tradelab.errors import SchemaMismatch
from tradelab.analysis.model import FeatureSchema, current_schema, load_model, train_model, write_training_set
from tradelab.analysis.pool import GlobalProcessPool, ParallelAnalyzer, _gone, analyze_in_process
from tradelab.records import AnalysisBatch, SeriesBatch
from tradelab.sim.synthetic import synthetic_market

N_SYMBOLS = 60


def _model(folder, name: str, weights: np.ndarray, schema: FeatureSchema):
    "A real model whose win probability follows `weights` over the first features."
    import pandas as pd
    rng = np.random.default_rng(len(name))
    n = 3000
    X = rng.normal(size=(n, schema.n)).astype(np.float32)
    logit = X[:, : len(weights)] @ weights
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    frame = pd.DataFrame(X, columns=list(schema.names)).assign(time_ms=np.arange(n), symbol="SYN", label=y)
    write_training_set(folder / f"{name}.parquet", frame, schema)
    return train_model(folder / f"{name}.parquet", folder / f"{name}.onnx", schema=schema, max_iter=40).path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder, schema = tmp_path_factory.mktemp("models"), current_schema()
    return {"a": _model(folder, "a", np.array([2.0, -1.0]), schema),
            "b": _model(folder, "b", np.array([-2.0, 1.0]), schema),
            "other_schema": _model(folder, "other", np.array([1.0]), FeatureSchema(schema.version + 1, schema.names))}


@pytest.fixture(scope="module")
def batch():
    settings, market = load_settings(env={}), synthetic_market(N_SYMBOLS, days=6, seed=3)
    frames = {tf: SeriesBatch.stack(tf, [market.series(s, tf).klines() for s in market.symbols], settings.data.limit(tf))
              for tf in settings.data.timeframes}
    return AnalysisBatch(tuple(market.symbols), frames, market.span_ms[1])


def _settings(**pool):
    return load_settings(env={}, pool={"workers": 2, "in_process_below": 0, **pool})


def _fingerprint(signals):
    return [(s.symbol, round(s.confidence, 9)) for s in signals]


def run(coro):
    return asyncio.run(coro)


def test_model_loads_once_per_worker(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer = ParallelAnalyzer(pool, settings)
            stamps = []
            for _ in range(10):
                await analyzer.analyze_async(batch)
                stamps += analyzer.last.workers
            return pool, stamps
    pool, stamps = run(go())
    assert len(pool.reports) == 2 and len({r.pid for r in pool.reports}) == 2
    assert all(r.model_loads == 1 and r.generation == 1 for r in pool.reports)
    assert {s.pid for s in stamps} <= {r.pid for r in pool.reports} and all(s.model_loads == 1 for s in stamps)
    assert pool.pools_created == 1


def test_survives_a_killed_worker(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer = ParallelAnalyzer(pool, settings)
            before, old = await analyzer.analyze_async(batch), list(pool.pids)
            os.kill(old[0], signal.SIGKILL)
            while not _gone(old[0]):
                await asyncio.sleep(0.01)
            for _ in range(3):  # the executor learns of the death from the forkserver: a cycle may end before it does
                after = await analyzer.analyze_async(batch)
                report = analyzer.last
                assert _fingerprint(after) == _fingerprint(before)
                if report.rebuilds:
                    break
            again = await analyzer.analyze_async(batch)
            return pool, analyzer, report, old, before, after, again
    pool, analyzer, report, old, before, after, again = run(go())
    assert before and _fingerprint(after) == _fingerprint(before) == _fingerprint(again)
    assert report.rebuilds == 1 and report.skipped == 0
    assert analyzer.last.rebuilds == 0  # the next cycle runs on the rebuilt pool as usual
    assert pool.pools_created == 2 and pool.generation == 2
    assert not set(pool.pids) & set(old) and len(pool.pids) == 2


def test_kill_between_cycles_is_retried_once(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer = ParallelAnalyzer(pool, settings)
            await analyzer.analyze_async(batch)
            for pid in pool.pids: os.kill(pid, signal.SIGKILL)
            signals = await analyzer.analyze_async(batch)
            return analyzer.last, signals
    last, signals = run(go())
    assert last.rebuilds == 1 and last.skipped == 0 and len(signals) > 0


def test_new_model_replaces_the_old_between_cycles(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer = ParallelAnalyzer(pool, settings)
            first, pids = await analyzer.analyze_async(batch), sorted(pool.pids)
            model_b = await analyzer.replace_model(models["b"])
            second = await analyzer.analyze_async(batch)
            return pool, analyzer, first, second, model_b, pids
    pool, analyzer, first, second, model_b, pids = run(go())
    a, b = load_model(models["a"]), load_model(models["b"])
    assert {s.model_version for s in first} == {a.version} and {s.model_version for s in second} == {b.version}
    assert {r.model_version for r in analyzer.last.workers} == {b.version}
    # the same workers, each having loaded model b once at its first task after the switch
    assert sorted(pool.pids) == pids and pool.pools_created == 1
    assert {(r.pid, r.model_loads) for r in analyzer.last.workers} <= {(p, 2) for p in pids}
    X = np.stack([s.features for s in second])
    np.testing.assert_allclose([s.model_prob for s in second], b.predict_proba(X), atol=1e-6)
    p_a, p_b = a.predict_proba(X), b.predict_proba(X)
    assert np.abs(p_a - p_b).max() > 1e-3  # the two models disagree, so the swap is visible


def test_wrong_schema_is_refused_before_the_workers(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer, pids = ParallelAnalyzer(pool, settings), list(pool.pids)
            with pytest.raises(SchemaMismatch, match=r"schema version \d+; this tradelab computes version \d+"):
                await analyzer.replace_model(models["other_schema"])
            signals = await analyzer.analyze_async(batch)
            return pool, pids, signals
    pool, pids, signals = run(go())
    assert pool.pids == pids and pool.pools_created == 1
    assert {s.model_version for s in signals} == {load_model(models["a"]).version}
    fresh = GlobalProcessPool(_settings().pool, models["other_schema"])
    with pytest.raises(SchemaMismatch):
        fresh.start()
    assert fresh.pools_created == 0 and not fresh.started


def test_one_shared_block_serves_every_cycle_and_grows_with_the_batch(models, batch):
    "Cycles rewrite one block the workers keep mapped; a bigger batch gets a bigger block; close removes it."
    small = batch.take(slice(0, 20))

    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer, phases = ParallelAnalyzer(pool, settings), []
            for b in (small, batch, small):
                mapped = {}
                for _ in range(3):
                    signals = await analyzer.analyze_async(b)
                    mapped.update({w.pid: w.blocks_mapped for w in analyzer.last.workers})
                phases.append((pool.staging.shm.name, pool.staging.blocks_created, mapped, signals))
            return pool, phases
    pool, phases = run(go())
    (name1, created1, mapped1, _), (name2, created2, mapped2, grown), (name3, created3, mapped3, _) = phases
    assert created1 == 1 and set(mapped1.values()) == {1}                  # 3 cycles, one block, one mapping per worker
    assert name2 != name1 and created2 == 2
    assert all(m == 1 + (pid in mapped1) for pid, m in mapped2.items())    # the new block is mapped once more
    assert (name3, created3) == (name2, 2) and all(m <= 2 for m in mapped3.values())  # a smaller batch fits: no new block
    assert pool.staging.shm is None and pool.pools_created == 1
    for name in (name1, name2):
        with pytest.raises(FileNotFoundError):
            SharedMemory(name)
    direct = analyze_in_process(batch, _settings().strategy, load_model(models["a"]), 0.5).signals
    assert sorted(_fingerprint(grown)) == sorted(_fingerprint(direct))


def test_a_task_past_its_timeout_is_skipped_and_the_pool_recovers(models, batch):
    async def go():
        async with GlobalProcessPool(_settings().pool, models["a"]) as pool:
            hurried = ParallelAnalyzer(pool, _settings(task_timeout_s=1e-4))
            skipped = await hurried.analyze_async(batch)
            report = hurried.last
            normal = await ParallelAnalyzer(pool, _settings()).analyze_async(batch)
            return pool, report, skipped, normal
    pool, report, skipped, normal = run(go())
    assert skipped == [] and report.skipped == N_SYMBOLS and report.rebuilds == 1
    assert pool.generation == 2 and len(normal) > 0


def test_pool_and_in_process_agree(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            pooled = await ParallelAnalyzer(pool, settings).analyze_async(batch)
        local = _settings(workers=0)
        async with GlobalProcessPool(local.pool, models["a"]) as here:
            analyzer = ParallelAnalyzer(here, local)
            return pooled, await analyzer.analyze_async(batch), analyzer.last, here
    pooled, inproc, last, here = run(go())
    assert last.in_process and here.pools_created == 0
    assert _fingerprint(pooled) == _fingerprint(inproc)
    direct = analyze_in_process(batch, _settings().strategy, load_model(models["a"]), 0.5).signals
    assert sorted(_fingerprint(direct)) == sorted(_fingerprint(inproc))


def test_the_event_loop_keeps_running_during_a_cycle(models, batch):
    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            task = asyncio.ensure_future(ParallelAnalyzer(pool, settings).analyze_async(batch))
            for _ in range(3): await asyncio.sleep(0)
            running = not task.done()
            return running, await task
    running, signals = run(go())
    assert running and signals


def test_symbols_that_fail_are_dropped_one_line_each(models, batch, caplog):
    "A batch whose 5m closes are one bar short breaks every symbol: each is dropped and logged once, the cycle survives."
    broken = batch.take(slice(0, 8))
    broken.frames["5m"].close = broken.frames["5m"].close[:, :-1]

    async def go():
        settings = _settings()
        async with GlobalProcessPool(settings.pool, models["a"]) as pool:
            analyzer = ParallelAnalyzer(pool, settings)
            with caplog.at_level("WARNING", logger="tradelab.analysis.pool"):
                dropped = await analyzer.analyze_async(broken)
            report = analyzer.last
            return dropped, report, await analyzer.analyze_async(batch)
    dropped, report, healthy = run(go())
    assert dropped == [] and report.failed == broken.symbols and report.skipped == 0
    assert sorted(r.getMessage().split()[0] for r in caplog.records if r.name == "tradelab.analysis.pool") == sorted(broken.symbols)
    assert healthy


def test_a_script_without_main_guard_fails_fast(tmp_path):
    "Workers import the main script again; without the guard they die at once, and start() says so at once."
    script = tmp_path / "unguarded.py"
    script.write_text("from tradelab.config import load_settings\n"
                      "from tradelab.analysis.pool import GlobalProcessPool\n"
                      "GlobalProcessPool(load_settings(env={}, pool={'workers': 2}).pool).start().close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    assert "tradelab.errors.ModelError: a pool worker process exited while starting" in out.stderr


def test_the_forkserver_starts_with_ctrl_c_blocked(tmp_path):
    "A terminal's Ctrl-C reaches the forkserver too; while it imports its preload it must not die with a traceback."
    script = tmp_path / "mask.py"
    script.write_text("import re, signal\n"
                      "import psutil\n"
                      "from tradelab.config import load_settings\n"
                      "from tradelab.analysis.pool import GlobalProcessPool\n"
                      "if __name__ == '__main__':\n"
                      "    with GlobalProcessPool(load_settings(env={}, pool={'workers': 1}).pool) as pool:\n"
                      "        server = psutil.Process(pool.pids[0]).ppid()\n"
                      "        status = open(f'/proc/{server}/status').read()\n"
                      "        blocked = int(re.search(r'SigBlk:\\s*(\\w+)', status).group(1), 16)\n"
                      "        print(blocked >> (signal.SIGINT - 1) & 1, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "False"]  # blocked in the forkserver, not left blocked here
