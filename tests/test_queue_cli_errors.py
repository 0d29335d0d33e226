"""A Redis the queue cannot use, met by real processes: a port with nothing listening, a server that requires a
password (none given, or a wrong one), a database that does not exist. Workers give up after --reconnect-limit,
at once on a refused password, and promptly on SIGTERM; every command says so in one line (password redacted) with
the README's exit code. Plus the help texts and `stats` at 80 columns."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
import redis
import typer

from tests.fixtures.redis_server import ROOT, RedisServer, free_port, run_bounded, spawn_worker, wait_for, \
    worker_config
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker
from workers.queue.errors import RedisUnusable

pytestmark = pytest.mark.timeout(400)  # a hang fails the test with every thread's stack

PASSWORD = "s3cret-pw"
EXIT_REDIS = 3  # README, "Exit codes"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    """A second redis-server of this module's own that requires PASSWORD."""
    server = RedisServer(str(tmp_path_factory.mktemp("locked")), password=PASSWORD)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def reap():
    """Worker processes a test starts; any still running at its end (a failed assertion) is killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def cli(*args: str, env: dict | None = None, timeout: float = GUARD_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.queue_cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def only_line(stderr: str) -> str:
    """The command's whole stderr is one `error:` line; -> that line."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def last_line(log: str) -> str:
    """A worker logs before it fails: its output ends with one `error:` line and holds no traceback."""
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, log
    return lines[-1]


def pending(r, prefix: str) -> int:
    try:
        return r.xpending(f"{prefix}:requests", f"{prefix}:workers")["pending"]
    except redis.ResponseError:  # no group yet
        return 0


def wait_log(proc: subprocess.Popen, path, text: str) -> None:
    wait_for(lambda: text in path.read_text() or proc.poll() is not None, GUARD_S, f"{text!r} in {path}")
    assert text in path.read_text(), f"the process exited ({proc.returncode}) first:\n{path.read_text()}"


# ---- workers -------------------------------------------------------------------------------------------------------
def test_worker_gives_up_after_its_reconnect_limit_with_one_line(queue_prefix, tiny_model_dir, tmp_path, reap):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    w = spawn_worker(url, queue_prefix, tiny_model_dir, "A", "--reconnect-limit", "2", "--until-empty",
                     log_dir=str(tmp_path))
    reap.append(w)
    assert w.wait(GUARD_S) == EXIT_REDIS
    log = (tmp_path / "A.log").read_text()
    assert "retrying with backoff" in log  # it did retry before giving up
    line = last_line(log)
    assert f"cannot reach Redis at {url} for 2 s" in line and "--reconnect-limit" in line
    assert "check the host and port" in line


def test_worker_stops_promptly_on_sigterm_while_redis_is_unreachable(queue_prefix, tiny_model_dir, tmp_path, reap):
    url = f"redis://127.0.0.1:{free_port()}/0"
    w = spawn_worker(url, queue_prefix, tiny_model_dir, "A", "--until-empty", log_dir=str(tmp_path))
    reap.append(w)
    wait_log(w, tmp_path / "A.log", "retrying with backoff")  # the default limit, 300 s, is far off
    w.send_signal(signal.SIGTERM)
    assert w.wait(60) == 0  # long before the limit: the signal ended the wait
    log = (tmp_path / "A.log").read_text()
    assert "stopped while Redis at" in log and "held no entries" in log and "Traceback" not in log


def test_worker_stopped_while_redis_is_down_leaves_its_held_entries_pending(
        queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam, reap):
    server = RedisServer(str(tmp_path / "data"))  # append-only: its pending list survives the outage
    os.mkdir(server.dir)
    server.start()
    try:
        async def enqueue():
            async with QueueClient(server.url, queue_prefix) as client:
                return await client.submit_many({"id": f"r{i}", "prompt": "The quick brown fox",
                                                 "max_new_tokens": 3} for i in range(3))
        ids = asyncio.run(enqueue())
        seam.hooks({i: "hold:a" for i in ids})  # A holds all three until the gate opens, which it never sees
        a = spawn_worker(server.url, queue_prefix, tiny_model_dir, "A", "--claim-idle", "1", "--block-ms", "100",
                         log_dir=str(tmp_path))
        reap.append(a)
        r = server.client()
        wait_for(lambda: pending(r, queue_prefix) == 3, GUARD_S, "worker A to hold the 3 requests")
        server.stop(keep_data=True)
        wait_log(a, tmp_path / "A.log", "retrying with backoff")
        a.send_signal(signal.SIGTERM)
        assert a.wait(60) == EXIT_REDIS
        line = last_line((tmp_path / "A.log").read_text())
        assert f"stopped while Redis at {server.url} was unreachable: 3 held entries stay pending" in line
        server.start()
        consumers = server.client().xinfo_consumers(f"{queue_prefix}:requests", f"{queue_prefix}:workers")
        assert [(c["name"], c["pending"]) for c in consumers] == [(b"A", 3)]
        seam.open_gate("a")
        b = QueueWorker(queue_engine, worker_config(server.url, queue_prefix, name="B"))
        counters = asyncio.run(run_bounded(b))
        assert (counters.reclaimed, counters.processed) == (3, 3)
    finally:
        server.kill()


@pytest.mark.parametrize("password", [None, "wrong-pw"])
def test_worker_refused_by_redis_exits_at_once_before_loading_its_model(
        locked_redis, password, queue_prefix, tiny_model_dir, tmp_path, seam, reap):
    url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{locked_redis.port}/0"
    seam.hold_load()  # a worker that went on to load its model would wait here until the guard fails the test
    w = spawn_worker(url, queue_prefix, tiny_model_dir, "A", log_dir=str(tmp_path))
    reap.append(w)
    assert w.wait(GUARD_S) == EXIT_REDIS
    assert not [n for n in os.listdir(seam.dir) if n.startswith("loading.")]
    log = (tmp_path / "A.log").read_text()
    line = last_line(log)
    if password is None:
        assert f"Redis at redis://127.0.0.1:{locked_redis.port}/0 requires a password" in line
    else:
        assert f"Redis at redis://:***@127.0.0.1:{locked_redis.port}/0 refused the password" in line
        assert password not in log
    assert "retrying" not in log


def test_worker_loop_treats_a_refused_password_as_fatal_not_as_a_connection_error(
        locked_redis, queue_prefix, queue_engine):
    """The worker's own Redis calls (not only the CLI's check before loading) stop at the first refusal."""
    url = f"redis://:wrong-pw@127.0.0.1:{locked_redis.port}/0"
    worker = QueueWorker(queue_engine, worker_config(url, queue_prefix))
    with pytest.raises(RedisUnusable, match=r"redis://:\*\*\*@127.0.0.1:\d+/0 refused the password"):
        asyncio.run(run_bounded(worker))
    assert worker.counters.reconnects == 0


# ---- client commands -----------------------------------------------------------------------------------------------
COMMANDS = {
    "enqueue": lambda tmp: ["enqueue", "--prompt", "hello", "--id", "x"],
    "results": lambda tmp: ["results", "--ids", str(tmp / "ids.txt"), "--out", str(tmp / "out.jsonl")],
    "stats": lambda tmp: ["stats"],
    "ray": lambda tmp: ["ray", "--model", "models/phi3-tiny-chat"],  # refused before Ray starts
}


CASES = ["no listener", "no password", "wrong password", "no such database"]


# `ray` against a port with nothing listening starts Ray and retries, as a worker does (tested above)
@pytest.mark.parametrize("command,case", [(c, k) for c in COMMANDS for k in CASES if (c, k) != ("ray", CASES[0])])
def test_every_command_says_in_one_line_why_redis_cannot_be_used(locked_redis, command, case, tmp_path):
    port = free_port() if case == "no listener" else locked_redis.port
    auth = {"no password": "", "no listener": "", "wrong password": ":wrong-pw@"}.get(case, f":{PASSWORD}@")
    url = f"redis://{auth}127.0.0.1:{port}/{99 if case == 'no such database' else 0}"
    (tmp_path / "ids.txt").write_text("x\n")
    out = cli(*COMMANDS[command](tmp_path), "--url", url)
    assert out.returncode == EXIT_REDIS, out.stderr
    line = only_line(out.stderr)
    assert out.stdout == "" and "wrong-pw" not in line and PASSWORD not in line
    shown = url.replace("wrong-pw", "***").replace(PASSWORD, "***")
    assert shown in line
    assert {"no listener": "check the host and port", "no password": "requires a password",
            "wrong password": "refused the password", "no such database": "has no database 99"}[case] in line
    assert not (tmp_path / "out.jsonl").exists()


# ---- help and stats ------------------------------------------------------------------------------------------------
def queue_commands():
    from pipeline.queue_cli import queue_app
    return typer.main.get_command(queue_app).commands


@pytest.mark.parametrize("name", ["enqueue", "worker", "ray", "results", "stats"])
def test_every_option_has_a_description_and_shows_its_default(name):
    import click
    command = queue_commands()[name]
    ctx = click.Context(command, info_name=name)
    for param in command.params:
        if param.name == "help":
            continue
        flags, text = param.get_help_record(ctx)
        description = re.sub(r"\s*\[.*\]$", "", text)  # click appends [default: ...], [required], [env var: ...]
        assert len(description.split()) >= 3, f"{name} {flags}: no description ({text!r})"
        assert "default" in text or "[required]" in text, f"{name} {flags}: no default shown ({text!r})"


@pytest.mark.parametrize("name,codes", [("enqueue", "023"), ("worker", "0123"), ("ray", "0123"),
                                        ("results", "0234"), ("stats", "023")])
def test_every_command_documents_its_exit_codes(name, codes):
    text = queue_commands()[name].help
    assert "Exit status:" in text
    assert set(re.findall(r"(?:^ |; )(\d) ", text.split("Exit status:")[1])) == set(codes), text


def test_stats_says_no_group_exists_before_any_worker_started(redis_url, queue_prefix):
    assert cli("enqueue", "--prompt", "hi", "--id", "a", "--url", redis_url, "--prefix", queue_prefix).returncode == 0
    out = cli("stats", "--url", redis_url, "--prefix", queue_prefix)
    assert out.returncode == 0, out.stderr
    assert "requests 1" in out.stdout and "no consumer group yet: no worker has started" in out.stdout
    assert "lag" not in out.stdout


def test_stats_is_readable_at_80_columns(redis_url, queue_prefix, queue_engine):
    name = "phi3-queue-worker-7d9f8c6b5-abcde"  # a Kubernetes pod name
    asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, name=name))))
    out = cli("stats", "--url", redis_url, "--prefix", queue_prefix, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in out.stdout, out.stdout
    words = set(out.stdout.split())
    for header in ("worker", "state", "pending", "in flight", "idle s", "seen s ago", "processed", "errors",
                   "failed", "dead", "reclaimed", "duplicates"):
        assert set(header.split()) <= words, f"{header!r} cut:\n{out.stdout}"
    assert "stopped" in words and "pending 0" in out.stdout
