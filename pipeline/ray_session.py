"""Ray for one command: join a cluster, or start a local Ray and stop all of it on every way out.

A local Ray is a tree of processes (gcs_server, raylet, and the raylet's dashboard and runtime-env agents, log
monitor, workers). `ray.shutdown()` stops what it knows of; a Ctrl-C in the middle of `ray.init`, before Ray has
recorded its processes, leaves them running, and agents whose raylet died are re-parented to init and live on.
So before starting a local Ray this process becomes a child subreaper (Linux): its orphaned descendants are
re-parented to it instead of init, and after `ray.shutdown()` whatever is left of the descendants that appeared
during the session is stopped and reaped. Processes of a joined cluster are not descendants, so they are never
touched, and neither are children this process had before the session.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import signal
import sys
import time

from phi3_model.engine.threads import engines_in_the_foreground

log = logging.getLogger("phi3_batch")
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
GRACE_S = 5.0       # SIGTERM to SIGKILL


def _prctl(option: int, arg) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, arg, 0, 0, 0)


def _subreaper(on: bool | None = None) -> bool | None:
    """The current flag (None where unsupported); sets it first when `on` is given."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if on is not None:
            _prctl(PR_SET_CHILD_SUBREAPER, int(on))
        flag = ctypes.c_int(0)
        _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
        return bool(flag.value)
    except (OSError, AttributeError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of `pid` (default: this process), parents before children."""
    found, todo = [], [pid or os.getpid()]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _reap(pids) -> None:
    """Collect the exit status of those that are our children (zombies otherwise)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def stop_descendants(before: set[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, to every descendant that is not in `before`, until none is left
    (a killed parent's children are re-parented to this subreaper and found on the next pass); returns them."""
    stopped: list[int] = []
    deadline = time.monotonic() + grace_s
    while True:
        left = [p for p in descendants() if p not in before]
        if not left:
            return stopped
        stopped += [p for p in left if p not in stopped]
        _signal(left, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
        _reap(left)
        time.sleep(0.05)


def local_worker_priority() -> None:
    """A Ray this process starts runs its workers (the engine actors) at this process's own priority. Ray's default
    worker niceness is 15, so on a machine with any other busy process at normal priority the engines would get
    the CPU last (seen: beside a busy loop per core, actors at nice 15 got about 3% of a core each). Only for a
    Ray started here: a cluster's operators set their own (RAY_worker_niceness), and a value already set wins."""
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))


@contextlib.contextmanager
def ray_session(address: str | None, local: bool, **init_kwargs):
    """Joins (or starts, when `local`) Ray unless this process is already connected; yields True when this call
    connected (and so disconnects on the way out). With `local`, every process the session started is gone when
    the block is left, however it is left (KeyboardInterrupt inside `ray.init` included)."""
    import ray
    if ray.is_initialized():
        yield False
        return
    before = set(descendants()) if local else set()
    was = _subreaper() if local else None
    stack = contextlib.ExitStack()
    if local:
        _subreaper(True)
        local_worker_priority()
        stack.enter_context(engines_in_the_foreground("local Ray: its processes and this driver"))
    try:
        ray.init(address=address, **init_kwargs)
        yield True
    finally:
        with _deferred_interrupt():   # a second Ctrl-C waits for the cleanup, then interrupts
            try:
                ray.shutdown()
            except Exception as e:  # noqa: BLE001 - what it left is stopped below
                log.warning("ray.shutdown failed: %s", e)
            if local:
                left = stop_descendants(before)
                if left:
                    log.debug("stopped %d process(es) the local Ray left: %s", len(left), left)
                if was is not None:
                    _subreaper(was)
            stack.close()


@contextlib.contextmanager
def _deferred_interrupt():
    """SIGINT during the block is held and raised as KeyboardInterrupt after it (main thread only)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if got:
        raise KeyboardInterrupt
