"""CPU threads of an engine: how many torch intra-op threads it uses, and the OpenMP rule that keeps them fast.

The rule (measured, bench.pipeline and bench.queue, issue 15): torch's CPU kernels run OpenMP parallel regions, and
GNU OpenMP keeps one team of worker threads per thread that starts regions. Once a process holds more such worker
threads than it has CPUs (a model loaded on one thread, stepped on another: two teams), libgomp stops letting idle
workers spin between regions and puts them to sleep instead, so each of the thousands of small regions of an engine
step pays a futex wake-up: a tiny model's step became 3x slower with two threads. So an engine does all of its torch
work on one thread (AsyncEngine builds the model on its own engine thread; EngineProcess steps on its child's main
thread), and a thread that hands a model over gives its own team back (`release_openmp_team`).

How many threads: the CPUs this process may run on (its affinity), capped by OMP_NUM_THREADS when set (Ray sets it
to an actor's num_cpus), unless the caller says (the native backend's `threads` option).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    n = usable_cpus()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


def decide(threads: int | None) -> tuple[int, str]:
    """(threads, why) for an engine in this process."""
    if threads:
        return int(threads), "set by the threads option"
    omp = os.environ.get("OMP_NUM_THREADS")
    why = f"{usable_cpus()} usable CPU(s)" + (f", OMP_NUM_THREADS={omp}" if omp else "")
    return default_threads(), why


def use_threads(threads: int) -> None:
    """Set torch's intra-op threads for the calling thread (OpenMP's setting is per thread)."""
    import torch
    torch.set_num_threads(threads)


def _libgomp():
    import torch
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    try:
        return ctypes.CDLL(path) if os.path.exists(path) else ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return None


def release_openmp_team() -> bool:
    """Free the OpenMP worker threads the calling thread started (omp_pause_resource_all, omp_pause_hard): the
    thread keeps working, a later parallel region starts a new team. False when torch does not use GNU OpenMP."""
    lib = _libgomp()
    if lib is None or not hasattr(lib, "omp_pause_resource_all"):
        return False
    return lib.omp_pause_resource_all(1) == 0


# ---- scheduling policy: the engine in the foreground of a job that put everything else in SCHED_BATCH -----------

FOREGROUND_ENV = "PHI3_ENGINE_FOREGROUND"  # set by whoever put the job's other processes in SCHED_BATCH


def policy_name(policy: int) -> str:
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, n)}
    return names.get(policy, str(policy))


def engine_foreground() -> str | None:
    """On the thread about to step an engine, before it starts its OpenMP workers (they inherit its policy): back
    to SCHED_OTHER when this process runs SCHED_BATCH because its job asked (FOREGROUND_ENV, set where a job's own
    local Ray is started: pipeline/ray_session). Why (issue 15, measured on 2 cores with two torch threads): every
    wake-up of another thread of the job (Ray's raylet, GCS, agents, the actor's own threads, the driver: some 900 a
    second) preempted one of the engine's two OpenMP threads and stalled the other at the next barrier, so the
    job's small extra work cost the engine twice its CPU time. A SCHED_BATCH thread does not preempt on wake-up; it
    runs when a CPU is free or at the next tick. Returns the calling thread's policy name (None where the OS has no
    policies)."""
    if not hasattr(os, "sched_getscheduler"):
        return None
    now = os.sched_getscheduler(0)
    if now == getattr(os, "SCHED_BATCH", None) and os.environ.get(FOREGROUND_ENV) == "1":
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            now = os.SCHED_OTHER
        except OSError as e:  # not expected: a thread may always leave SCHED_BATCH for SCHED_OTHER
            log.warning("engine thread stays in SCHED_BATCH: %s", e)
    return policy_name(now)


@contextlib.contextmanager
def engines_in_the_foreground(what: str):
    """While a job's own processes start and run: this thread, and so every thread and process started from it,
    runs SCHED_BATCH, and each engine's stepping thread goes back to SCHED_OTHER (engine_foreground, told through
    FOREGROUND_ENV, which child processes inherit). A SCHED_BATCH thread does not preempt a running one when it
    wakes, so the job's own bookkeeping no longer interrupts the engine's OpenMP threads mid-step (issue 15). Used
    where the job owns everything around its engines: a local Ray started by the Parquet job or `queue ray`
    (GCS, raylet, agents, actors; some 900 wake-ups a second on 2 cores) and a `queue worker` process (its event
    loop, Redis client and health beats). `what` names them in the log line. The thread's policy is restored on the
    way out. Linux only; elsewhere, or when the caller already chose a policy (chrt), nothing."""
    if not hasattr(os, "SCHED_BATCH") or os.sched_getscheduler(0) != os.SCHED_OTHER:
        yield   # another OS, or a policy the user chose: left as it is
        return
    had = os.environ.get(FOREGROUND_ENV)
    os.environ[FOREGROUND_ENV] = "1"
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    log.info("%s run SCHED_BATCH, the engines' stepping threads SCHED_OTHER", what)
    try:
        yield
    finally:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:  # not expected: leaving SCHED_BATCH for SCHED_OTHER needs no privilege
            log.warning("this thread stays in SCHED_BATCH: %s", e)
        if had is None:
            os.environ.pop(FOREGROUND_ENV, None)
        else:
            os.environ[FOREGROUND_ENV] = had
