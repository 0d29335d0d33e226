"""Host memory: a 3.8B Phi-3-mini builds in bf16 under 9 GB, loading never holds a second full copy, and the
native engine's KV pool costs only the pages its requests write.

Each measurement runs in a fresh interpreter and reads its own peak resident set, VmHWM in /proc/self/status.
`getrusage().ru_maxrss` is reported too but not asserted: Linux carries the parent's peak across fork+exec into
it (signal->maxrss), so in a child of a large pytest process it is only an upper bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from phi3_model.checkpoint import build_model, save_checkpoint
from phi3_model.config import Phi3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB, MiB = 10**9, 2**20

PEAK = """
def peak_bytes():  # this process's own high-water RSS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""

BUILD = PEAK + """
import json, resource, sys, time, torch
from phi3_model.checkpoint import build_model
from phi3_model.config import preset_config
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
wall, used = time.time(), cpu()
model = build_model(preset_config(sys.argv[1]), torch.bfloat16, load_weights_from=None)
wall, used = time.time() - wall, cpu() - used
params = list(model.parameters())
print(json.dumps({
    "peak_bytes": peak_bytes(), "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "wall_s": wall, "cpu_s": used,
    "numel": sum(p.numel() for p in params), "dtypes": sorted({str(p.dtype) for p in params}),
    "std": model.model.layers[31].mlp.down_proj.weight[:64].float().std().item(),
}))
"""

LOAD = PEAK + """
import json, sys, torch
from phi3_model.checkpoint import load_checkpoint
with torch.device("meta"):  # first use of the meta device maps ~150 MB of library code: not the loader's
    torch.nn.Embedding(2, 2)
before = peak_bytes()
model = load_checkpoint(sys.argv[1], torch.float32)
after = peak_bytes()
print(json.dumps({"growth_bytes": after - before,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""

POOL = PEAK + """
import json, sys, torch
from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import Engine, Request, SamplingParams
model = load_checkpoint(sys.argv[1])
before = peak_bytes()
engine = Engine(model, None, kv_cache_bytes=2**30, block_size=8)
outs = engine.generate([Request(list(range(3, 3 + 40 + i)), SamplingParams(max_new_tokens=8, temperature=0,
                                                                          ignore_eos=True)) for i in range(4)])
print(json.dumps({"growth_bytes": peak_bytes() - before, "pool_bytes": engine.cache.nbytes,
                  "lengths": [len(o.token_ids) for o in outs]}))
"""


def run(script: str, *args: str, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_random_phi3_mini_builds_in_bf16_under_9_gb():
    if available_bytes() < 10 * GB:
        pytest.skip(f"needs 10 GB free host memory, {available_bytes() / GB:.1f} GB available")
    r = run(BUILD, "phi3_mini_4k_instruct_en", timeout=380)
    report = (f"peak RSS {r['peak_bytes'] / GB:.2f} GB (ru_maxrss {r['ru_maxrss_bytes'] / GB:.2f} GB), "
              f"build {r['wall_s']:.0f} s wall / {r['cpu_s']:.0f} s CPU")
    print(f"\n[memory] phi3-mini bf16 random init: {report}")
    assert r["numel"] == 3_821_079_552 and r["dtypes"] == ["torch.bfloat16"], r
    assert r["peak_bytes"] < 9 * GB, report  # bf16 weights alone are 7.64 GB
    assert 0.018 < r["std"] < 0.022, r  # initialised, N(0, 0.02)


@pytest.mark.timeout(120)
def test_loading_a_bf16_checkpoint_into_fp32_holds_at_most_one_shard_extra(tmp_path):
    # ~169M parameters: 674 MB in fp32, stored as 337 MB of bf16 in 7 shards of <= 48 MB (+ one big tensor)
    config = Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)
    save_checkpoint(build_model(config, torch.float32, seed=0), str(tmp_path), dtype=torch.bfloat16,
                    max_shard_bytes=48 * 10**6)
    largest_shard = max(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    r = run(LOAD, str(tmp_path), timeout=100)
    model, growth = r["model_bytes"], r["growth_bytes"]
    # One shard mapped plus one tensor being cast (<= a shard) beyond the model; a loader holding every bf16
    # tensor before casting would add the whole 337 MB.
    bound = model + 2 * largest_shard + 32 * MiB
    print(f"\n[memory] load bf16 -> fp32: grew {growth / MiB:.0f} MiB for a {model / MiB:.0f} MiB model "
          f"(bound {bound / MiB:.0f} MiB)")
    assert model == config.num_parameters() * 4
    assert growth < bound, f"grew {growth / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB, model {model / MiB:.0f} MiB"


@pytest.mark.timeout(120)
def test_the_kv_pool_costs_the_pages_requests_write_not_its_size(tiny_model_dir):
    # 1 GiB of pool for 4 requests of ~50 tokens (a few hundred KB of keys): zero-filling it at start would make the
    # peak grow by the whole GiB; the engine's own bookkeeping for 512k blocks is tens of MB
    r = run(POOL, tiny_model_dir, timeout=100)
    assert r["pool_bytes"] == 2**30 and r["lengths"] == [8] * 4, r
    assert r["growth_bytes"] < 2**30 // 4, f"peak grew {r['growth_bytes'] / MiB:.0f} MiB for a 1024 MiB pool"
