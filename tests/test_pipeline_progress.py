"""Progress counts rows as they finish, inside a shard still in flight, not only when the shard is done.

One input file, one shard: four rows generate one token each and four generate 64. The engine is held with the
test seam after 8 steps: by then the one-token rows have finished (their token comes from the prefill step) and the
64-token rows cannot have (each step adds one token to a row). The progress log line must say 4 of 8 rows while
the shard is still in flight; no verdict depends on how fast anything runs. Real local Ray (the session's), the
CLI as a real process joining it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tests.fixtures.seam import GUARD_S
from tests.pipeline_helpers import PROMPTS, ROOT

SHORT, LONG = 1, 64


def test_rows_finished_inside_a_shard_in_flight_show_in_the_progress_line(ray_local, tiny_model_dir, tmp_path,
                                                                          seam):
    src = tmp_path / "in"
    os.makedirs(src)
    lengths = [SHORT, LONG] * 4
    pq.write_table(pa.table({"prompt": PROMPTS[:8], "max_new_tokens": lengths}), str(src / "one.parquet"))
    short = lengths.count(SHORT)
    seam.hold(after_steps=8)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-i", str(src), "-o", str(tmp_path / "out"),
                             "--model", tiny_model_dir, "--dtype", "float32", "--device", "cpu", "--address",
                             ray_local, "--cpus-per-actor", "1", "--stop-token-ids", "none", "--progress", "log",
                             "--log-every-s", "0.2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        pid, steps = seam.held()
        assert steps == 8
        deadline = time.monotonic() + GUARD_S
        want = f"{short}/8 rows, 0/1 shards"
        while not any(want in line for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        # while held, nothing more can finish: no line may claim more rows than the short ones
        counts = [int(m.group(1)) for line in list(lines) if (m := re.search(r"INFO (\d+)/8 rows", line))]
        assert max(counts) == short, counts
    finally:
        seam.release()
    proc.wait(timeout=GUARD_S)   # stderr is the reader's alone (communicate would race it); stdout is a short summary
    reader.join(GUARD_S)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert any("8/8 rows, 1/1 shards" in line for line in lines)
    rows = pq.read_table(str(tmp_path / "out" / "one.parquet")).to_pylist()
    assert [r["completion_tokens"] for r in rows] == lengths


def test_finished_rows_free_their_room_in_the_engine_before_their_group_comes_back():
    """workers.rows.InFlight: a group's rows come back together, but each stops counting against the actor's
    in-flight rows as it finishes (the engine adds to the group's count), so a group held by one long row no longer
    keeps the engine's queue empty. Hand-computed against capacity 6 and groups of 2."""
    import asyncio

    from workers.rows import InFlight

    async def scenario():
        progress = [0, 0]
        limit = InFlight(6)
        a, b, c = [await limit.take(2, progress) for _ in range(3)]
        assert limit.free == 0
        a[0] += 1   # as the engine counts finished requests (generate_many's `finished`), from a's and b's
        b[0] += 1   # one short row each, and both of c's
        c[0] += 2
        assert progress[0] == 4 and limit.free == 6 - 1 - 1 - 0
        await limit.give(c)
        d = await limit.take(2, progress)   # counting whole groups, room for d only: 6 - 2 - 2
        e = await limit.take(2, progress)   # and e must wait for a long row's group
        assert limit.free == 0
        f = asyncio.ensure_future(limit.take(2, progress))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not f.done()                 # full: nothing but a group coming back can make room
        a[0] += 1   # a's long row
        e[0] += 1
        assert limit.free == 6 - 0 - 1 - 2 - 1
        for _ in range(5):
            await asyncio.sleep(0)
        assert not f.done()                 # rows finishing do not wake the caller; a group coming back does
        await limit.give(a)
        await asyncio.wait_for(f, GUARD_S)
        assert limit.free == 6 - 1 - 2 - 1 - 2 and progress[0] == 6
        for g in (b, d, e, f.result()):
            await limit.give(g)
        assert limit.free == 6

    asyncio.run(scenario())
