"""deploy/: manifests that Kubernetes and KubeRay accept, `phi3-batch` invocations the real CLI parses, one image name
everywhere, and a liveness probe that follows the queue worker's real health hash."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib

import kubernetes_validate
import pytest
import typer
import yaml
from typer.testing import CliRunner

from tests.fixtures.redis_server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = "1.30.0"
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
RAY_PIN = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")).split("==")[1]
PHI3_MINI_PARAMS = 3_821_079_552  # /work/shared/reference/phi3.md
MANIFESTS = sorted(f for f in os.listdir(DEPLOY) if f.endswith(".yaml") and f != "runtime_env.yaml")
DOCS = [(f, d) for f in MANIFESTS for d in yaml.safe_load_all(open(os.path.join(DEPLOY, f))) if d]
SECRETS = {d["metadata"]["name"]: d["stringData"] for _, d in DOCS if d["kind"] == "Secret"}


def read(name: str) -> str:
    return open(os.path.join(DEPLOY, name)).read()


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in DOCS if d["kind"] == kind]


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests create."""
    out = []
    for f, d in DOCS:
        if d["kind"] == "RayJob":
            c = d["spec"]["rayClusterSpec"]
            out.append((f"{f} head", c["headGroupSpec"]["template"]["spec"]))
            out += [(f"{f} {g['groupName']}", g["template"]["spec"]) for g in c["workerGroupSpecs"]]
        elif d["kind"] in ("Deployment", "Job"):
            out.append((f, d["spec"]["template"]["spec"]))
    return out


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args (unknown names stay as they are)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def pod_env(container: dict, pod_name: str = "phi3-queue-worker-7d9f-abcde", secrets=None) -> dict:
    secrets = secrets or SECRETS
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets.get(ref["name"], {}), f"secret {ref} is not in deploy/secrets.example.yaml"
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[e["name"]] = pod_name
    return env


def worker_container() -> dict:
    [(_, d)] = of_kind("Deployment")
    return d["spec"]["template"]["spec"]["containers"][0]


# ---- phi3-batch invocations ---------------------------------------------------------------------------------------
def cli():
    from pipeline.cli import app
    return typer.main.get_command(app)


def from_phi3_batch(argv: list[str]) -> list[str] | None:
    return argv[argv.index("phi3-batch") + 1:] if "phi3-batch" in argv else None


def submit_dry_run(*args: str) -> list[str]:
    out = subprocess.run(["bash", os.path.join(DEPLOY, "submit.sh"), *args], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "RAY_ADDRESS": "http://ray-head:8265"}, timeout=10)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


@functools.cache
def invocations() -> list[tuple[str, list[str]]]:
    """(where, arguments after `phi3-batch`) for every command the manifests, submit.sh and Dockerfile run."""
    found = [(f"{f} entrypoint", from_phi3_batch(shlex.split(d["spec"]["entrypoint"]))) for f, d in of_kind("RayJob")]
    for where, spec in pod_specs():
        for c in spec["containers"]:
            env = pod_env(c)
            found.append((f"{where} {c['name']}", from_phi3_batch([expand(a, env) for a in
                                                                  c.get("command", []) + c.get("args", [])])))
    found.append(("submit.sh", from_phi3_batch(submit_dry_run("s3://b/in/", "s3://b/out/", "--max-new-tokens", "8"))))
    cmd = re.search(r"^CMD (\[.*\])$", read("Dockerfile"), re.M)
    found.append(("Dockerfile CMD", from_phi3_batch(json.loads(cmd[1]))))
    return [(w, argv) for w, argv in found if argv is not None]


def readme_invocations() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)
    lines = [line.split("#")[0] for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    inline = re.findall(r"`(phi3-batch [^`]+)`", read("README.md"))
    return [from_phi3_batch(shlex.split(x)) for x in lines + inline if "phi3-batch " in x]


def resolve_command(argv: list[str]) -> tuple[list[str], object, list[str]]:
    """(subcommand path, its command object, the arguments left for it)."""
    cmd, path = cli(), []
    while hasattr(cmd, "commands") and argv and argv[0] in cmd.commands:
        path.append(argv[0])
        cmd, argv = cmd.commands[argv[0]], argv[1:]
    return path, cmd, argv


@functools.cache
def help_flags(path: tuple[str, ...]) -> set[str]:
    from pipeline.cli import app
    out = CliRunner().invoke(app, [*path, "--help"], terminal_width=250, env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert out.exit_code == 0, out.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.output))


def test_every_flag_used_in_deploy_exists_in_the_cli_help():
    used = invocations() + [("README.md", argv) for argv in readme_invocations()]
    assert {tuple(resolve_command(argv)[0]) for _, argv in used} >= {("run",), ("queue", "worker"), ("queue", "ray")}
    wrong = []
    for where, argv in used:
        path, _, rest = resolve_command(argv)
        missing = {a.split("=")[0] for a in rest if a.startswith("--")} - help_flags(tuple(path))
        if missing:
            wrong.append(f"{where}: `phi3-batch {' '.join(path)}` has no {sorted(missing)} (see its --help)")
    assert not wrong, "\n".join(wrong)


def test_every_invocation_parses_with_the_cli_and_its_engine_options_with_the_backend():
    from workers.vllm_backend import VLLMOptions
    wrong = []
    for where, argv in invocations():
        path, cmd, rest = resolve_command(argv)
        if hasattr(cmd, "commands"):  # `phi3-batch --help`
            continue
        try:
            params = cmd.make_context(" ".join(["phi3-batch", *path]), rest).params
        except Exception as e:  # typer's (vendored) click usage errors
            wrong.append(f"{where}: phi3-batch {' '.join(argv)}: {getattr(e, 'format_message', e.__str__)()}")
            continue
        if params.get("backend") == "vllm":
            pairs = [kv.split("=", 1) for kv in params.get("engine_option") or params.get("option") or []]
            VLLMOptions.model_validate({k: json.loads(v) for k, v in pairs})
    assert not wrong, "\n".join(wrong)


def test_queue_commands_read_the_redis_url_the_manifests_set():
    for sub in ("worker", "ray"):
        [url] = [p for p in cli().commands["queue"].commands[sub].params if "--url" in p.opts]
        assert url.envvar == "PHI3_REDIS_URL"
    assert "PHI3_REDIS_URL" in pod_env(worker_container())
    [(_, job)] = [(f, d) for f, d in of_kind("RayJob") if "queue" in d["spec"]["entrypoint"].split()]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "PHI3_REDIS_URL" in pod_env(head) and "--url" not in job["spec"]["entrypoint"]


def test_redis_url_is_built_from_the_secret():
    from redis.connection import parse_url

    from workers.queue.connection import check_url
    url = pod_env(worker_container())["PHI3_REDIS_URL"]
    host, port = SECRETS["phi3-redis"]["address"].rsplit(":", 1)
    assert check_url(url) and "$(" not in url
    assert parse_url(url).items() >= {"host": host, "port": int(port),
                                      "password": SECRETS["phi3-redis"]["password"]}.items()


# ---- manifests ----------------------------------------------------------------------------------------------------
def validate(where: str, doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {e.message} at {'.'.join(map(str, e.path))}")


CRDS = ("ray.io/v1", "keda.sh/v1alpha1", "monitoring.coreos.com/v1")  # not in Kubernetes' schemas: checked below


def test_core_manifests_validate_against_the_kubernetes_schemas():
    assert {d["kind"] for _, d in DOCS} >= {"Deployment", "Secret", "PersistentVolumeClaim", "Job", "RayJob",
                                            "ScaledObject", "TriggerAuthentication", "PodMonitor"}
    for f, d in DOCS:
        if d["apiVersion"] not in CRDS:
            validate(f"{f} {d['kind']}/{d['metadata']['name']}", d)


def test_rayjob_pod_templates_validate_as_pod_templates():
    for f, d in of_kind("RayJob"):
        c = d["spec"]["rayClusterSpec"]
        for group in [c["headGroupSpec"], *c["workerGroupSpecs"]]:
            validate(f"{f} {group.get('groupName', 'head')}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                                "metadata": {"name": "t"}, "template": group["template"]})


def gib(quantity: str) -> float:
    units = {"Gi": 2**30, "Mi": 2**20, "G": 1e9, "M": 1e6}
    unit = next((u for u in units if quantity.endswith(u)), "")
    return float(quantity.removesuffix(unit)) * units.get(unit, 1) / 2**30


def test_rayjobs_have_what_kuberay_requires():
    for f, d in of_kind("RayJob"):
        name, spec = d["metadata"]["name"], d["spec"]
        assert d["apiVersion"] == "ray.io/v1"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, f"{f}: {name}: DNS-1035, <= 47"
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("phi3-batch ")
        assert spec["shutdownAfterJobFinishes"] is True, f"{f}: the cluster (and its GPUs) must go when the job ends"
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and 0 <= spec["ttlSecondsAfterFinished"] <= 3600
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == RAY_PIN
        head = cluster["headGroupSpec"]
        groups = cluster["workerGroupSpecs"]
        assert head["template"]["spec"]["containers"] and groups
        for g in [head, *groups]:
            assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{f}: rayStartParams are strings"
        for g in groups:
            assert g["groupName"] and g["template"]["spec"]["containers"]
            assert all(isinstance(g[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            tolerations = g["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_gpu_pods_are_sized_for_phi3_mini_in_bf16():
    weights_gib = PHI3_MINI_PARAMS * 2 / 2**30  # 7.1 GiB
    gpu_pods = [(w, s) for w, s in pod_specs() if "nvidia.com/gpu" in str(s)]
    assert len(gpu_pods) == 3  # two RayJob worker groups, the Deployment
    for where, spec in gpu_pods:
        limits = spec["containers"][0]["resources"]["limits"]
        requests = spec["containers"][0]["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], where
        assert gib(limits["memory"]) >= 4 * weights_gib and int(limits["cpu"]) >= 4, f"{where}: {limits}"
        shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm for vLLM and the object store"


def test_every_secret_and_volume_claim_a_pod_uses_is_defined_here():
    claims = {d["metadata"]["name"] for _, d in of_kind("PersistentVolumeClaim")}
    for where, spec in pod_specs():
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert not ref or ref["key"] in SECRETS.get(ref["name"], {}), f"{where}: {ref}"
            for e in c.get("envFrom", []):
                assert e["secretRef"]["name"] in SECRETS, where


def test_queue_worker_pods_drain_on_sigterm_within_the_grace_period():
    [(_, d)] = of_kind("Deployment")
    spec, c = d["spec"]["template"]["spec"], worker_container()
    assert "command" not in c and c["args"][:3] == ["phi3-batch", "queue", "worker"], "tini (ENTRYPOINT) is PID 1"
    assert "--until-empty" not in c["args"]
    max_model_len = int(next(a.split("=")[1] for a in c["args"] if a.startswith("max_model_len=")))
    # every held request finishes within max_model_len tokens at >= 10 tokens/s per sequence
    assert spec["terminationGracePeriodSeconds"] >= max_model_len / 10


def test_queue_rayjob_drains_and_exits():
    [(_, job)] = [(f, d) for f, d in of_kind("RayJob") if "queue" in d["spec"]["entrypoint"].split()]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["phi3-batch", "queue", "ray"] and "--until-empty" in argv and "--name" in argv


# ---- image and Dockerfile -----------------------------------------------------------------------------------------
def dockerfile() -> str:
    text = read("Dockerfile")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), text)


def image() -> str:
    return re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", read("Dockerfile"))[1]


def test_image_name_is_the_same_in_every_file():
    assert image().rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    for f, d in DOCS:
        for c in re.findall(r"'image': '([^']+)'", str(d)):
            assert c == image(), f"{f}: image {c}"
    for name in os.listdir(DEPLOY):
        for mention in re.findall(r"[\w.-]+(?:/[\w.-]+)*/phi3-batch:[\w.-]+", read(name)):
            assert mention == image(), f"deploy/{name}: {mention}"
    assert re.search(rf"^IMAGE={re.escape(image())}$", read("submit.sh"), re.M)


def test_dockerfile_builds_a_non_root_cuda_image_with_the_vllm_extra():
    text = dockerfile()
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu", text, re.M)
    assert PYPROJECT["project"]["optional-dependencies"]["vllm"] == ["vllm==0.32.0"]
    assert re.search(r'pip install "\.\[vllm\]"', text)
    assert f'"ray[default]=={RAY_PIN}"' in text, "the dashboard and job server at the pinned Ray version"
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    uid = int(re.search(rf"useradd .*--uid (\d+) .*\b{user}$", text, re.M)[1])
    assert user != "root" and uid != 0
    for where, spec in pod_specs():
        assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["runAsNonRoot"], where
    assert re.search(r'^ENTRYPOINT \["tini", "--"\]$', text, re.M), "PID 1 forwards SIGTERM and reaps"
    venv = re.search(r"python3 -m venv (\S+)", text)[1]
    assert f"ENV PATH={venv}/bin:$PATH" in text and f"export PATH={venv}/bin:$PATH' > /etc/profile.d/" in text


def test_dockerfile_copies_every_package_and_the_dockerignore_lets_them_in():
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile(), re.M))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == packages and all(os.path.isdir(os.path.join(ROOT, p)) for p in packages)
    allowed = set(re.findall(r"^!(\S+)$", read("Dockerfile.dockerignore"), re.M))
    assert allowed >= packages | {"pyproject.toml", "README.md"}


# ---- models -------------------------------------------------------------------------------------------------------
def test_hf_model_handle_resolves_from_the_cache_the_pods_mount(tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    from phi3_model.config import preset_config
    from phi3_model.presets import HF_REPOS, resolve
    cache = re.search(r"HF_HUB_CACHE=(\S+)", dockerfile())[1]
    assert yaml.safe_load(read("runtime_env.yaml"))["env_vars"]["HF_HUB_CACHE"] == cache
    handles = {a for _, argv in invocations() for a in argv if a.startswith("hf://")}
    [(_, download)] = of_kind("Job")
    assert handles == {"hf://" + pod_env(download["spec"]["template"]["spec"]["containers"][0])["REPO"]}
    for where, spec in pod_specs():
        if "hf://" in str(spec) or where.endswith("models.yaml"):
            mounts = [m for c in spec["containers"] for m in c["volumeMounts"] if cache.startswith(m["mountPath"] + "/")]
            claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
            assert [claim[m["name"]] for m in mounts] == ["phi3-models"], f"{where}: mounts {cache}"
    [handle] = handles
    repo = handle.removeprefix("hf://")
    preset = next(p for p, r in HF_REPOS.items() if r == repo)
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    preset_config(preset).save(str(snap))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config, directory = resolve(handle)
    assert try_to_load_from_cache(repo, "config.json", cache_dir=str(tmp_path / "hub")) == str(snap / "config.json")
    lengths = {int(a.split("=")[1]) for _, argv in invocations() for a in argv if a.startswith("max_model_len=")}
    assert directory == str(snap) and lengths and max(lengths) <= config.max_position_embeddings


# ---- scripts ------------------------------------------------------------------------------------------------------
def test_shell_scripts_parse():
    for name in sorted(os.listdir(DEPLOY)):
        if name.endswith(".sh"):
            out = subprocess.run(["bash", "-n", os.path.join(DEPLOY, name)], capture_output=True, text=True)
            assert out.returncode == 0, f"deploy/{name}: {out.stderr}"


def test_submit_script_runs_a_valid_ray_job_submit_with_the_runtime_env():
    from ray.dashboard.modules.job.cli import job_cli_group
    from ray.runtime_env import RuntimeEnv
    argv = submit_dry_run("s3://b/in dir/", "s3://b/out/", "--actors", "2")
    assert argv[:3] == ["ray", "job", "submit"]
    params = job_cli_group.commands["submit"].make_context("submit", argv[3:]).params
    assert params["address"] == "http://ray-head:8265"
    entry = list(params["entrypoint"])
    assert entry[:2] == ["phi3-batch", "run"] and entry[entry.index("--input") + 1] == "s3://b/in dir/"
    assert entry[-2:] == ["--actors", "2"], "the caller's flags come last, so they win"
    env = yaml.safe_load(open(os.path.join(ROOT, params["runtime_env"])))
    assert set(env) <= RuntimeEnv.known_fields and RuntimeEnv(**env)["working_dir"] == "."
    usage = subprocess.run(["bash", os.path.join(DEPLOY, "submit.sh")], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 2 and "usage:" in usage.stderr and image() in usage.stderr


# ---- liveness probe against a real Redis and the worker's real health hash ---------------------------------------
def probe(env: dict, subprocess_run: bool = False) -> tuple[int, str]:
    """(exit status, output) of the Deployment's liveness probe in a pod whose environment is `env`."""
    command = worker_container()["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    if subprocess_run:
        out = subprocess.run([sys.executable, *command[1:]], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=30)
        return out.returncode, out.stdout + out.stderr
    stdout = io.StringIO()  # in-process: the same code, without a 1 s interpreter start
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            exec(compile(command[2], "<probe>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    return code, stdout.getvalue()


def test_liveness_probe_follows_the_workers_health_hash(redis_server, queue_prefix):
    from workers.queue.connection import Names, connect
    from workers.queue.health import Counters, Health
    secrets = {**SECRETS, "phi3-redis": {"address": f"127.0.0.1:{redis_server.port}", "password": ""}}
    env = pod_env(worker_container(), pod_name="phi3-queue-worker-0", secrets=secrets)
    env["PHI3_QUEUE_PREFIX"] = queue_prefix
    c = worker_container()
    assert c["startupProbe"]["exec"] == c["livenessProbe"]["exec"]

    async def publish():
        r = connect(env["PHI3_REDIS_URL"])
        name = env["PHI3_WORKER_NAME"]
        await Health(r, Names(queue_prefix).worker(name), name, Counters(), ttl_s=60).publish("running", 3)
        await r.aclose()

    assert probe(env)[0] == 1, "no health hash yet (the model is loading)"
    asyncio.run(publish())
    code, out = probe(env, subprocess_run=True)
    assert code == 0, out
    time.sleep(0.5)
    assert probe({**env, "PHI3_HEALTH_MAX_AGE_S": "0.4"})[0] == 1, "no refresh for longer than the allowed age"
    assert probe({**env, "PHI3_WORKER_NAME": "another-pod"})[0] == 1
    code, out = probe({**env, "PHI3_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert code == 0 and "unreachable" in out, "a Redis outage restarts no worker"


# ---- autoscaling (KEDA), scraping (Prometheus Operator), dashboard (Grafana) -------------------------------------
# The fields these objects may have and their types, as KEDA 2.20 defines them (kedacore/keda:
# apis/keda/v1alpha1/scaledobject_types.go ScaledObjectSpec/AdvancedConfig/ScaleTarget, scaletriggers_types.go
# ScaleTriggers/AuthenticationRef, triggerauthentication_types.go AuthTargetRef) and the redis-streams trigger's
# metadata keys (pkg/scalers/redis_streams_scaler.go redisStreamsMetadata, redis_scaler.go redisConnectionInfo: the
# `keda:"name=..."` tags; a key read from resolvedEnv may also be given as <key>FromEnv). Trigger metadata is a
# map[string]string: every value a string. PodMonitor: prometheus-operator's monitoring.coreos.com/v1
# (pkg/apis/monitoring/v1/podmonitor_types.go PodMonitorSpec and PodMetricsEndpoint, the json tags; a subset: the
# fields an operator of these workers would set).
I32, STR, OBJ, LIST = int, str, dict, list
KEDA_SPEC = {"scaleTargetRef": {"name": STR, "apiVersion": STR, "kind": STR, "envSourceContainerName": STR},
             "pollingInterval": I32, "initialCooldownPeriod": I32, "cooldownPeriod": I32, "idleReplicaCount": I32,
             "minReplicaCount": I32, "maxReplicaCount": I32, "advanced": {
                 "horizontalPodAutoscalerConfig": {"behavior": OBJ, "name": STR},
                 "restoreToOriginalReplicaCount": bool, "scalingModifiers": OBJ},
             "triggers": LIST, "fallback": {"failureThreshold": I32, "replicas": I32, "behavior": STR}}
KEDA_TRIGGER = {"type": STR, "name": STR, "useCachedMetrics": bool, "metadata": OBJ,
                "authenticationRef": {"name": STR, "kind": STR}, "metricType": STR}
REDIS_STREAMS_KEYS = {"stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
                      "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl", "address", "addresses", "host",
                      "hosts", "port", "ports", "username", "password", "sentinelUsername", "sentinelPassword",
                      "sentinelMaster"}
FROM_ENV = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password", "sentinelUsername",
            "sentinelPassword", "sentinelMaster"}
REDIS_AUTH_PARAMS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                     "sentinelUsername", "sentinelPassword", "sentinelMaster", "tls", "cert", "key", "keyPassword",
                     "ca"}
POD_MONITOR_SPEC = {"selector": {"matchLabels": OBJ, "matchExpressions": LIST}, "podMetricsEndpoints": LIST,
                    "namespaceSelector": OBJ, "jobLabel": STR, "podTargetLabels": LIST, "sampleLimit": int}
POD_METRICS_ENDPOINT = {"port": STR, "path": STR, "scheme": STR, "interval": STR,
                        "scrapeTimeout": STR, "honorLabels": bool, "relabelings": LIST, "metricRelabelings": LIST}


def check_fields(where: str, obj: dict, allowed: dict) -> None:
    for key, value in obj.items():
        assert key in allowed, f"{where}: {key!r} is not a field ({sorted(allowed)})"
        want = allowed[key]
        if isinstance(want, dict):
            assert isinstance(value, dict), f"{where}.{key}: expected an object"
            check_fields(f"{where}.{key}", value, want)
        else:
            assert isinstance(value, want) and not (want is int and isinstance(value, bool)), \
                f"{where}.{key}: {value!r} is not a {want.__name__}"


def one(kind: str) -> dict:
    [(_, d)] = of_kind(kind)
    return d


def redis_triggers() -> list[dict]:
    return [t for t in one("ScaledObject")["spec"]["triggers"] if t["type"] == "redis-streams"]


def test_keda_objects_have_only_the_fields_keda_defines():
    so, auth = one("ScaledObject"), one("TriggerAuthentication")
    assert so["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    check_fields("ScaledObject.spec", so["spec"], KEDA_SPEC)
    assert so["spec"]["scaleTargetRef"]["name"] and so["spec"]["triggers"]
    for i, t in enumerate(so["spec"]["triggers"]):
        check_fields(f"triggers[{i}]", t, KEDA_TRIGGER)
        assert t["type"] == "redis-streams"
        for key, value in t["metadata"].items():
            assert key in REDIS_STREAMS_KEYS or key.removesuffix("FromEnv") in FROM_ENV, f"triggers[{i}]: {key}"
            assert isinstance(value, str), f"triggers[{i}].metadata.{key}: {value!r} must be a string"
        for key in ("pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex"):
            assert key not in t["metadata"] or t["metadata"][key].isdigit(), f"triggers[{i}].{key}: an integer"
    assert set(auth["spec"]) == {"secretTargetRef"}
    for ref in auth["spec"]["secretTargetRef"]:
        assert set(ref) == {"parameter", "name", "key"} and ref["parameter"] in REDIS_AUTH_PARAMS


def test_keda_scales_the_worker_deployment_on_its_stream_and_group_from_zero():
    from urllib.parse import urlsplit

    from workers.queue.config import WorkerConfig
    from workers.queue.connection import Names
    so, auth, deployment = one("ScaledObject")["spec"], one("TriggerAuthentication"), one("Deployment")
    assert so["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": deployment["metadata"]["name"]}
    env = pod_env(worker_container())
    names = Names(env["PHI3_QUEUE_PREFIX"])
    assert env["PHI3_QUEUE_PREFIX"] == WorkerConfig.model_fields["prefix"].default  # the worker's default prefix
    [lag] = [t for t in redis_triggers() if "lagCount" in t["metadata"]]
    assert "activationLagCount" in lag["metadata"] and so["minReplicaCount"] == 0 < so["maxReplicaCount"]
    tls = "true" if env["PHI3_REDIS_URL"].startswith("rediss://") else "false"
    for t in redis_triggers():
        m = t["metadata"]
        assert (m["stream"], m["consumerGroup"]) == (names.requests, names.group)
        db = urlsplit(env["PHI3_REDIS_URL"]).path.strip("/") or "0"
        assert m.get("enableTLS", "false") == tls and m.get("databaseIndex", "0") == db
        assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
    # KEDA's credentials: the keys of the same Secret the workers' URL is built from
    used = {e["valueFrom"]["secretKeyRef"]["key"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in worker_container()["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {r["key"]: r["name"] for r in auth["spec"]["secretTargetRef"]} == used
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"address", "password"}


def test_scale_down_waits_longer_than_a_drain():
    so, pod = one("ScaledObject")["spec"], one("Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    down = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert so["cooldownPeriod"] > grace and down["stabilizationWindowSeconds"] >= grace
    # entries held by workers keep them up even when nothing is left undelivered
    assert any("pendingEntriesCount" in t["metadata"] for t in redis_triggers())


def test_pod_monitor_scrapes_the_workers_metrics_port():
    pm, deployment, c = one("PodMonitor"), one("Deployment"), worker_container()
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    check_fields("PodMonitor.spec", pm["spec"], POD_MONITOR_SPEC)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    check_fields("podMetricsEndpoints[0]", endpoint, POD_METRICS_ENDPOINT)
    [port] = [p for p in c["ports"] if p["name"] == endpoint["port"]]
    assert c["args"][c["args"].index("--metrics-port") + 1] == str(port["containerPort"])
    assert endpoint["path"] == "/metrics"


def test_the_dashboard_uses_only_metrics_the_code_exports():
    from workers.job_metrics import exported_names
    from workers.metrics import metric_names
    dash = json.loads(read("grafana-dashboard.json"))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\b(?:ray_)?phi3_batch_\w+", e)}
    known = metric_names() | exported_names()
    assert used <= known, f"not exported by the code: {sorted(used - known)}"
    for must in ("phi3_batch_queue_processed_total", "phi3_batch_queue_stream_lag",
                 "phi3_batch_engine_time_to_first_token_seconds", "phi3_batch_engine_kv_blocks_used",
                 "phi3_batch_queue_failed_total", "phi3_batch_queue_dead_lettered_total",
                 "ray_phi3_batch_job_rows_total"):
        assert must in used, f"the dashboard has no panel on {must}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
