"""The Parquet job on other shapes of Ray: logical GPUs, a cluster started with `ray start` and a job submitted to it
with `ray job submit`, and the vLLM backend in an actor. Each cluster here is its own, started in a subprocess, so
the session's Ray is never disturbed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import PROMPTS, default_sigint, job, read_outputs, reference_generate, write_prompts
from tests.test_engine_structured import NEW, constraints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def env() -> dict:
    paths = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    # token auth on every side (head, submit, status) so they agree whether or not ~/.ray/auth_token exists yet
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")


def phi3_batch() -> list[str]:
    """The installed console script, or the module when the checkout is not installed."""
    script = os.path.join(BIN, "phi3-batch")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "pipeline.cli"]


@pytest.mark.slow
def test_two_actors_with_one_gpu_each_get_distinct_gpu_ids(tiny_model_dir, tmp_path):
    src = write_prompts(str(tmp_path / "in"))
    config = job(src, str(tmp_path / "out"), tiny_model_dir, max_new_tokens=2, shard_rows=4, actors="auto",
                 gpus_per_actor=1)
    script = textwrap.dedent(f"""
        import json, ray, pipeline
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
        summary = pipeline.run({config!r})
        print("SUMMARY " + json.dumps(dict(ok=summary.ok, actors=summary.actors)))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.split("SUMMARY ", 1)[1])
    gpus = [a["gpu_ids"] for a in summary["actors"]]
    assert summary["ok"] and len(gpus) == 2                       # auto: 2 GPUs / 1 per actor
    assert all(len(g) == 1 for g in gpus) and sorted(g[0] for g in gpus) == ["0", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_missing() -> str | None:
    from ray._private.utils import get_dashboard_dependency_error
    error = get_dashboard_dependency_error()
    return None if error is None else f"ray job submission needs ray[default] (dashboard): {error}"


@pytest.mark.slow
@pytest.mark.skipif(dashboard_missing() is not None, reason=str(dashboard_missing()))
def test_ray_job_submit_to_a_head_started_with_ray_start(tiny_model_dir, tmp_path, ray_tmp):
    """`ray start --head` on free ports, `ray job submit -- phi3-batch run ...`, SUCCEEDED, outputs checked, head
    stopped. The head is stopped through its own `ray start --block` process (SIGINT makes it take its processes
    down) rather than `ray stop`, which kills every Ray on the machine, the session's included."""
    src = write_prompts(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "node-manager-port", "object-manager-port", "runtime-env-agent-port", "metrics-export-port",
             "ray-client-server-port")
    ports = {name: free_port() for name in names}
    ray = os.path.join(BIN, "ray")
    # SIGINT's default action in the head: a suite started in the background inherits it ignored, and the head was
    # then stopped only by the SIGKILL below, 60 s later (84 s for this test instead of 25)
    head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", ray_tmp,
                             "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=default_sigint)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 with Ray's token auth): it is up
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the head did not come up"
                time.sleep(1)
        submit = subprocess.run(
            [ray, "job", "submit", "--address", address, "--submission-id", "phi3-batch-test", "--",
             *phi3_batch(), "run", "-i", src, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", "4",
             "--shard-rows", "8", "--dtype", "float32", "--device", "cpu", "--progress", "log"],
            env=env(), capture_output=True, text=True, timeout=400)
        status = subprocess.run([ray, "job", "status", "--address", address, "phi3-batch-test"], env=env(),
                                capture_output=True, text=True, timeout=60)
        said = status.stdout + status.stderr  # `ray job status` logs "Job '<id>' succeeded" (status SUCCEEDED)
        assert "job 'phi3-batch-test' succeeded" in said.lower(), said[-2000:] + submit.stderr[-2000:]
    finally:
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    summary = json.load(open(os.path.join(out, "_summary.json")))
    assert summary["ok"] and summary["rows_ok"] == len(PROMPTS)
    assert [r["prompt"] for r in read_outputs(out)] == PROMPTS


@pytest.mark.slow
@pytest.mark.vllm
def test_a_vllm_job_equals_generate_and_leaves_its_temp_directory_as_it_was(vllm_model_dir, tmp_path, ray_tmp):
    """`phi3-batch run --backend vllm` (its own local Ray, the engine in an actor): completions equal
    Phi3CausalLM.generate (native engine, greedy) on the same checkpoint, whose greedy tokens the vLLM tests check
    against HF transformers, for plain rows, one row per structured-output kind (per-row request fields) and a row
    asking for logprobs.

    One job checks both (a vLLM job costs tens of seconds): vLLM's engines are closed before their actors end (its
    file store rendezvous vllm_dist_*, its engine core), its sockets go to a directory of the engine's own, removed
    with it, and the backend writes no generation config, so TMPDIR, set for the command and so for the local Ray it
    starts and its actors, is as it was afterwards (Ray's own files go to RAY_TMPDIR). It starts with what any temp
    directory holds once torch has run there: importing torch._dynamo (vLLM does) creates torch's per-user cache
    directory torchinductor_<user>."""
    pytest.importorskip("vllm")
    import getpass

    from phi3_model.causal_lm import Phi3CausalLM
    from tests.pipeline_helpers import run_cli
    lm = Phi3CausalLM.from_preset(vllm_model_dir, dtype="float32", device="cpu")
    lm.compile(sampler="greedy")
    prompts = PROMPTS[:8]
    src = write_prompts(str(tmp_path / "in"), {"p.parquet": (prompts, 3)})
    kinds = constraints()
    structured = [dict(prompt=PROMPTS[i], max_new_tokens=NEW, **{k: json.dumps(v) if k == "json_schema" else
                                                                  list(v) if k == "choice" else v
                                                                  for k, v in fields.items()})
                  for i, (fields, _) in enumerate(kinds)] + [dict(prompt=PROMPTS[0], max_new_tokens=6, logprobs=2)]
    names = list(dict.fromkeys(k for r in structured for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in structured]),
                   os.path.join(src, "s.parquet"))
    tmp = tempfile.mkdtemp(prefix="tmp", dir="/tmp")
    os.makedirs(os.path.join(tmp, f"torchinductor_{getpass.getuser()}"))
    before = sorted(os.listdir(tmp))
    out = tmp_path / "out"
    try:
        result = run_cli(["run", "-i", src, "-o", str(out), "--model", vllm_model_dir, "--backend", "vllm",
                          "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "8", "--shard-rows", "3",
                          "--engine-option", "max_model_len=512", "--engine-option", "max_num_seqs=16",
                          "--engine-option", "kv_cache_space_gib=1", "--progress", "off"],
                         env={"TMPDIR": tmp, "RAY_TMPDIR": ray_tmp}, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(os.listdir(tmp)) == before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = json.load(open(out / "_summary.json"))
    n = len(prompts) + len(structured)
    assert summary["ok"] and summary["rows_ok"] == n and summary["actors"][0]["backend"] == "vllm", summary
    rows = pq.read_table(str(out / "p.parquet")).to_pylist()
    assert [r["completion"] for r in rows] == reference_generate(lm, prompts, 8)
    rows = pq.read_table(str(out / "s.parquet")).to_pylist()
    for i, ((fields, check), row) in enumerate(zip(kinds, rows)):   # valid, and the native engine's greedy value
        check(row["completion"])
        ids = lm.tokenizer.encode(PROMPTS[i], add_bos=True)
        assert row["completion"] == lm.generate(PROMPTS[i], max_length=len(ids) + NEW, strip_prompt=True,
                                                **fields), fields
    want = lm.generate_details(PROMPTS[0], max_length=len(lm.tokenizer.encode(PROMPTS[0], add_bos=True)) + 6,
                               logprobs=2)
    got = rows[-1]["logprobs"]
    assert [e["token_id"] for e in got] == [e.token_id for e in want.logprobs]
    assert all(abs(e["logprob"] - w.logprob) < 1e-4 for e, w in zip(got, want.logprobs))
