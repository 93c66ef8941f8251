"""A writer process killed with SIGKILL loses nothing it committed and records nothing twice.

The writer (`WRITER`, run as `python -c`) works in numbered steps. Step k, in ONE transaction:
saves batch k (N new positions with features), marks the still-open half of batch k-1, closes the
other half of batch k-1 (position rows and archive rows) and appends a STEP marker (a refusal
record with time_ms = k). It prints `committed k` only after COMMIT returned. On start it resumes:
it replays the last committed step (which must change nothing) and goes on. Positions are generated
deterministically from (step, index), so the expected content of the file after steps 0..K is known.
"""
import contextlib
import queue
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import pytest

from tradelab.storage.store import Database, PositionReader

N = 2000          # positions per step
HALF = N // 2
T0 = 1_700_000_000_000

WRITER = r'''
import sys, time
from collections import namedtuple
import numpy as np
from tradelab.trading.positions import ExitReason, Kind, Position
from tradelab.records import Side
from tradelab.storage.store import Database, PositionRepository, RefusalRecord, RefusalRepository

path, hold_at, steps, N, HALF, T0 = sys.argv[1], *map(int, sys.argv[2:])
SCHEMA = namedtuple("Schema", "version names")(99, tuple(f"f{i}" for i in range(16)))

def position(k, i):
    side = Side.LONG if i % 2 else Side.SHORT
    s = int(side)
    return Position(kind=Kind.VIRTUAL if i % 3 else Kind.REAL, symbol=f"S{i % 50:02d}USDT", side=side, entry=100.0,
                    stop=100.0 - 2 * s, target=100.0 + 4 * s, size=1.0, leverage=1, opened_ms=T0 + k, expiry_ms=T0 + 10**9,
                    features=np.full(16, k + i / N, np.float32), fee_rate=0.0005, id=f"b{k:05d}-{i:05d}")

def step(db, repo, k, replay=False):
    batch = [position(k, i) for i in range(N)]
    prev = [position(k - 1, i) for i in range(N)] if k else []
    for p in prev[HALF:]: p.mark, p.mark_ms = 100.0 + k / 1000, T0 + k
    for i, p in enumerate(prev[:HALF]):
        p.close(p.target, ExitReason.TARGET, T0 + k) if i % 2 else p.close(p.stop, ExitReason.STOP, T0 + k)
    with db.transaction():
        repo.save_open(batch)
        repo.update_marks(prev[HALF:])
        newly = repo.close_many(prev[:HALF])
        if not replay: RefusalRepository(db).record(RefusalRecord(k, "STEP", "commit"))
        if k == hold_at:
            print(f"holding {k}", flush=True)
            time.sleep(600)
    return newly

db = Database(path)
db.conn.execute("PRAGMA cache_size=-64")  # 64 KiB of page cache: a big transaction spills into the WAL before COMMIT
repo = PositionRepository(db, SCHEMA)
done = [r.time_ms for r in RefusalRepository(db).recent(limit=1)]
start = done[0] + 1 if done else 0
if done:
    print(f"replayed {done[0]} closed {step(db, repo, done[0], replay=True)}", flush=True)
for k in range(start, steps):
    print(f"begin {k}", flush=True)
    step(db, repo, k)
    print(f"committed {k}", flush=True)
print("finished", flush=True)
'''


class Writer:
    "The writer process and a thread that queues its output lines."

    def __init__(self, path, hold_at=-1, steps=10_000):
        args = [str(path), *map(str, (hold_at, steps, N, HALF, T0))]
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout: self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        "The next line starting with `prefix` (all lines are kept in `seen`)."
        deadline = time.monotonic() + timeout
        while True:
            try: line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"writer said nothing starting with {prefix!r}; stderr: {self._stderr()}") from None
            self.seen.append(line)
            if line.startswith(prefix): return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL
        while not self.lines.empty(): self.seen.append(self.lines.get())

    def committed(self) -> list[int]:
        return [int(x.split()[1]) for x in self.seen if x.startswith("committed ")]

    def _stderr(self) -> str:
        if self.proc.poll() is None: return "(still running)"
        return self.proc.stderr.read()[-2000:]


def check_consistent(path) -> int:
    "Every invariant of the file after the writer's committed steps; the last committed step."
    with Database(path) as db:
        assert db.integrity_check() == "ok"
        c = db.conn
        steps = [r[0] for r in c.execute("SELECT time_ms FROM refusals WHERE symbol = 'STEP' ORDER BY time_ms")]
        last = steps[-1] if steps else -1
        assert steps == list(range(last + 1)), "STEP markers are not 0..K, each once"
        n_rows, n_distinct = c.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM positions").fetchone()
        assert n_rows == n_distinct == N * (last + 1), "positions lost, duplicated or left over from an uncommitted step"
        per_step = dict(c.execute("SELECT substr(id, 2, 5) + 0, COUNT(*) FROM positions GROUP BY 1"))
        assert per_step == {k: N for k in range(last + 1)}, "a step is only partly in the file"
        closed = c.execute("SELECT COUNT(*) FROM positions WHERE state = 'CLOSED'").fetchone()[0]
        assert closed == HALF * max(last, 0)
        n_arch, n_arch_distinct = c.execute("SELECT COUNT(*), COUNT(DISTINCT position_id) FROM archive").fetchone()
        assert n_arch == n_arch_distinct == closed, "archive rows differ from closed positions"
        orphan = c.execute("SELECT COUNT(*) FROM archive a LEFT JOIN positions p ON p.id = a.position_id "
                           "WHERE p.state IS NOT 'CLOSED'").fetchone()[0]
        assert orphan == 0, "an archive row whose position is not closed"
        stale = c.execute("SELECT COUNT(*) FROM positions WHERE state != 'CLOSED' AND substr(id, 2, 5) + 0 < ? "
                          "AND mark_ms != ? + substr(id, 2, 5) + 1", (last, T0)).fetchone()[0]
        assert stale == 0, "an open position of an earlier batch lacks the mark of the step after it"
        live = PositionReader(db).load_open()
        assert len(live) == N * (last + 1) - closed
    return last


def wal_frames(wal_path) -> tuple[int, int]:
    "(valid frames, frames up to the last commit frame) of a WAL file, read from its format."
    with open(wal_path, "rb") as f: b = f.read()
    page, salt = struct.unpack(">I", b[8:12])[0], b[16:24]
    off, frames, committed = 32, 0, 0
    while off + 24 + page <= len(b) and b[off + 8:off + 16] == salt:
        frames += 1
        if struct.unpack(">I", b[off + 4:off + 8])[0]: committed = frames  # a commit frame records the database size
        off += 24 + page
    return frames, committed


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "writer.sqlite"


def test_kill_inside_a_transaction(db_path):
    "Killed while holding a large uncommitted transaction: the file reopens at the last commit, exactly."
    w = Writer(db_path, hold_at=3)
    w.wait_for("holding 3")
    frames, committed = wal_frames(f"{db_path}-wal")
    assert frames > committed, "the held transaction has written uncommitted pages into the WAL"
    with contextlib.closing(sqlite3.connect(db_path)) as reader:  # meanwhile a reader sees the committed steps only
        assert reader.execute("SELECT COUNT(*) FROM positions").fetchone()[0] == 3 * N
    w.kill()
    assert w.committed() == [0, 1, 2]
    assert check_consistent(db_path) == 2

    w = Writer(db_path, steps=6)
    assert w.wait_for("replayed") == "replayed 2 closed 0"
    w.wait_for("finished")
    assert w.proc.wait(timeout=30) == 0
    assert w.committed() == [3, 4, 5]
    assert check_consistent(db_path) == 5


def test_repeated_kills_during_bulk_writes(db_path):
    "Killed at random moments of continuous bulk writes, five times: nothing committed is lost, nothing doubles."
    rng = random.Random(20240601)
    last, reported = -1, []
    for _ in range(5):
        w = Writer(db_path)
        if last >= 0: assert w.wait_for("replayed") == f"replayed {last} closed 0"
        w.wait_for(f"begin {last + 3}")  # two steps committed in this round, the third one under way
        time.sleep(rng.uniform(0.0, 0.06))
        w.kill()
        reported += w.committed()
        last = check_consistent(db_path)
        assert reported[-1] <= last, f"the writer reported step {reported[-1]} committed but the file ends at {last}"
    assert reported == sorted(set(reported)), "a step was reported committed twice"
