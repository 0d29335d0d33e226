"""`phi3-batch queue ray --actors N`: Ray actors as consumers of the same group (a CLI process with its own local
Ray, native engine, tiny model)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.redis_server import ROOT, audit
from workers.queue import QueueClient

pytestmark = pytest.mark.timeout(600)


def test_ray_actors_drain_one_group_each_request_once(redis_server, redis_url, queue_prefix, tiny_model_dir):
    async def enqueue():
        async with QueueClient(redis_url, queue_prefix) as client:
            return await client.submit_many({"id": f"q{i}", "prompt_token_ids": [1, 5 + i, 9], "max_new_tokens": 3}
                                            for i in range(24))
    ids = asyncio.run(enqueue())
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "pipeline.queue_cli", "ray", "--actors", "2", "--cpus-per-actor",
                          "0.5", "--model", tiny_model_dir, "--name", "ray", "--until-empty", "--claim-idle", "5",
                          "--block-ms", "100", "--url", redis_url, "--prefix", queue_prefix],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["name"] for r in rows) == ["ray-0", "ray-1"]
    assert sum(r["processed"] for r in rows) == 24 and all(r["duplicates"] == 0 for r in rows)
    r = redis_server.client()
    workers = {json.loads(v)["worker"] for v in r.mget([f"{queue_prefix}:result:{i}" for i in ids])}
    assert workers <= {"ray-0", "ray-1"}
    audit(r, queue_prefix, ids)
