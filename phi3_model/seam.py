"""THE TEST SEAM: fault injection and holds for tests, across processes. Off (every call a no-op) unless the
environment variable PHI3_BATCH_TEST_SEAM names a directory; nothing in a request or a config can turn it on.

Tests drive it with files in that directory, so the same seam reaches engines in this process, in an engine
child process, in a queue-worker process and in Ray actors:
- `hold`: while it exists, an engine loop with work stops before its next step (writing `held`: "<pid> <steps
  completed>"); if it holds a number N, only once the engine has completed N steps. A message to the loop (a new
  request, an abort, close) wakes it for that message only. The test then acts on requests that are certainly
  still in flight, and removes `hold` (or raises N, replacing the file) to let the engine go on.
- `stall`: the first engine to reach a step claims it (renamed to `stall.<pid>`) and blocks in that step
  forever: a hung kernel, for the progress watchdog.
- `hold_load`: while it exists, loading a model waits (writing `loading.<pid>`): a worker stopped while loading.
- `hooks.json`: {request id: hook} for queue workers' engine calls: `raise` (the call fails), `exit` (the
  process dies in the call), `exit_after_write` (dies after writing the batch holding it, before acking),
  `hold:NAME` (the call waits until the file `release.NAME` exists).
A queue worker reads the variable once, when it is built (the hook check is on its per-request path); everything
else reads it at each call.
Waiting is polling at 5 ms: a verdict never depends on how fast the machine is, only on what the test released.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Callable

ENV = "PHI3_BATCH_TEST_SEAM"
POLL_S = 0.005


def root() -> str | None:
    return os.environ.get(ENV) or None


def _path(name: str) -> str | None:
    d = root()
    return os.path.join(d, name) if d else None


def write(path: str, text: str = "") -> None:
    """Create or replace a file in one step (the other side may be reading it). Tests use it for control files."""
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def _held(path: str, steps: int) -> bool:
    try:
        with open(path) as f:
            after = f.read().strip()
    except OSError:
        return False
    return not after or steps >= int(after)


def before_step(has_message: Callable[[], bool], steps: int) -> None:
    """Engine loops call this before each step that has work; `steps`: steps completed so far."""
    d = root()
    if d is None:
        return
    stall = os.path.join(d, "stall")
    try:
        os.rename(stall, f"{stall}.{os.getpid()}")
    except OSError:
        pass
    else:
        while True:  # never returns: the step hangs
            time.sleep(3600)
    hold = os.path.join(d, "hold")
    if _held(hold, steps):
        write(os.path.join(d, "held"), f"{os.getpid()} {steps}")
        while _held(hold, steps) and not has_message():
            time.sleep(POLL_S)


def before_load() -> None:
    """Model loading calls this first."""
    hold = _path("hold_load")
    if hold is None or not os.path.exists(hold):
        return
    write(f"{os.path.dirname(hold)}/loading.{os.getpid()}")
    while os.path.exists(hold):
        time.sleep(POLL_S)


_hooks: tuple[float, dict] = (-1.0, {})


def request_hook(request_id: str | None) -> str | None:
    """The hook hooks.json names for this request id (re-read when the file changes)."""
    global _hooks
    path = _path("hooks.json")
    if path is None or request_id is None:
        return None
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    if mtime != _hooks[0]:
        with open(path) as f:
            _hooks = (mtime, json.load(f))
    return _hooks[1].get(request_id)


async def before_request(request_id: str | None) -> None:
    """A queue worker's engine call of this request starts with its hook."""
    hook = request_hook(request_id)
    if hook is None:
        return
    if hook == "raise":
        raise RuntimeError("test hook: raise")
    if hook == "exit":
        os._exit(3)
    if hook.startswith("hold:"):
        release = _path("release." + hook.split(":", 1)[1])
        while not os.path.exists(release):
            await asyncio.sleep(POLL_S)


def after_results_written(request_ids) -> None:
    """A queue worker wrote these results and has not acked their entries yet."""
    if root() is not None and any(request_hook(i) == "exit_after_write" for i in request_ids):
        os._exit(3)


# ---- the test's side --------------------------------------------------------------------------------------------

def wait_for_file(path: str, timeout_s: float, what: str) -> str:
    """Tests: wait until `path` exists and return its text (the timeout only guards against hangs)."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what} ({path})")
        time.sleep(POLL_S)
    with open(path) as f:
        return f.read()
