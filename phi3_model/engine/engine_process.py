"""The engine in its own process, behind AsyncEngine's interface (`start`, `generate`, `close`).

Why: with the engine stepping in a thread of the caller's process (AsyncEngine), every bit of the caller's Python
work (a queue worker's Redis client, JSON, admission) holds the GIL that the engine thread needs between kernels;
with a small model, whose steps are mostly Python, that costs the engine a visible share of its speed. Here the
engine steps in a child process (as vLLM's engine core does), running the same engine loop (loop.run_loop).

Protocol over one socket pair (pickled tuples):
  parent -> child  ("spec", EngineSpec) once, then ("work", [(rid, Request)], [rid to abort]) ... ("close",)
  child -> parent  ("ready", max_model_len) or ("failed", error text), then ("done", [(rid, Completion | None,
                   (kind, message) | None)], longest step s, engine stats snapshot) for each step that finished
                   something, and at least once a second while stepping (the parent's progress watchdog);
                   ("stats", snapshot) when the loop took requests or aborts, before its next step
The child ignores SIGINT/SIGTERM (the parent decides when it stops: a terminal's Ctrl-C reaches the whole process
group, and a draining worker still needs its engine) and dies with the parent (PR_SET_PDEATHSIG, and EOF on the
socket).
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .engine import Engine, EngineConfig
from .loop import Front, run_loop, settle_futures
from .sampling_params import EngineDied, RequestError
from .threads import engine_foreground

log = logging.getLogger(__name__)
TICK_S = 1.0  # longest silence of a stepping child


@dataclass
class EngineSpec:
    """What the child needs to build its engine (load_model_and_tokenizer's arguments)."""
    model: str
    dtype: str = "auto"
    device: str = "auto"
    config: EngineConfig | None = None
    threads: int | None = None  # torch CPU threads in the child
    cpus: tuple[int, ...] | None = None  # the child's CPU affinity (None: wherever the OS schedules it)


class EngineProcess(Front):
    def __init__(self, spec: EngineSpec, stall_timeout_s: float | None = None):
        super().__init__(stall_timeout_s)
        self.spec = spec
        self.max_model_len = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._adds: list = []
        self._aborts: list[int] = []
        self._flush_pending = False
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue | None = None
        self._sender: threading.Thread | None = None
        self._closing = False
        self._stats: dict | None = None  # the engine's figures as of the child's last message

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _running(self) -> bool:
        return self._proc is not None

    def stats(self) -> dict | None:
        """The engine's figures (engine/stats.py) as of the child's last message: after every step that finished
        a request, at least once a second while it steps, and whenever it took requests or aborts. None before
        the first."""
        return self._stats

    async def start(self) -> None:
        if self._proc is not None:
            return
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                                      pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                      stdout=2)  # the caller's stdout may be machine-read (the worker's JSON)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._closing, self.error = False, None
        self._outbox = queue.SimpleQueue()
        self._outbox.put(("spec", self.spec))
        self._sender = threading.Thread(target=self._send_loop, name="phi3-engine-sender", daemon=True)
        self._sender.start()
        ready = loop.create_future()
        self._reader = threading.Thread(target=self._read, args=(self._proc, loop, ready), name="phi3-engine-reader",
                                        daemon=True)
        self._reader.start()
        try:
            self.max_model_len = await ready
        except BaseException:  # failed or cancelled while loading: nothing to save, kill it at once
            await self._shutdown(graceful=False)
            raise
        self.watchdog.start()

    async def close(self) -> None:
        await self._shutdown(graceful=True)

    async def _shutdown(self, graceful: bool) -> None:
        self.watchdog.stop()
        if self._proc is None:
            return
        self._closing = True
        self._outbox.put(("close",))
        self._outbox.put(None)
        proc, self._proc = self._proc, None
        loop = asyncio.get_running_loop()
        if not graceful:
            proc.kill()
        try:
            await loop.run_in_executor(None, proc.wait, 30)
        except subprocess.TimeoutExpired:
            log.warning("engine process %d did not exit within 30 s of close; killing it", proc.pid)
            proc.kill()
            await loop.run_in_executor(None, proc.wait)
        await loop.run_in_executor(None, self._reader.join)
        await loop.run_in_executor(None, self._sender.join)
        self._conn.close()

    def _stalled(self, why: str) -> None:
        super()._stalled(why)
        proc = self._proc
        if proc is not None:
            proc.kill()  # a hung child holds memory and maybe a device; the reader then sees it exit

    # ---- parent side -----------------------------------------------------------------------------------
    def _send(self, loop, adds=(), aborts=()) -> None:
        """Requests made during one turn of the event loop go to the child as one message."""
        with self._lock:
            self._adds += adds
            self._aborts += aborts
            if self._flush_pending:
                return
            self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            adds, aborts, self._adds, self._aborts, self._flush_pending = self._adds, self._aborts, [], [], False
        self._outbox.put(("work", adds, aborts))

    def _send_loop(self) -> None:
        """Sender thread: a child busy with a long step reads nothing until it ends, so a full socket buffer
        blocks this thread, never the caller's event loop."""
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except OSError:  # the child is gone: the reader fails every waiter
                return

    def _read(self, proc: subprocess.Popen, loop, ready: asyncio.Future) -> None:
        """Reader thread: settles finished requests, one wake-up of each caller's loop per message."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "ready":
                settle_futures(loop, [(ready, msg[1], None)])
            elif kind == "failed":
                self._closing = True  # the child exits next; start() raises this
                settle_futures(loop, [(ready, None, RuntimeError(f"engine process: {msg[1]}"))])
            elif kind == "stats":  # the engine took requests or aborts (not progress: no step ran)
                self._stats = msg[1]
            elif kind == "done":
                self._stats = msg[3]
                self.watchdog.progress(msg[2])
                self._settle((rid, completion, _error(err)) for rid, completion, err in msg[1])
        code = proc.wait()
        error = RuntimeError("engine closed") if self._closing else EngineDied(
            f"engine process {proc.pid} exited (code {code})")
        if not self._closing and self.error is None:
            self.error = error
            log.error("%s", error)
        settle_futures(loop, [(ready, None, error)])
        self._fail_all(self.error or error)


def _error(err: tuple[str, str] | None) -> BaseException | None:
    return None if err is None else (RequestError if err[0] == "request" else RuntimeError)(err[1])


# ---- child side ------------------------------------------------------------------------------------------
class _SocketTransport:
    def __init__(self, conn: Connection, engine: Engine):
        self.conn, self.engine = conn, engine
        self.last_sent = time.monotonic()

    def receive(self, block: bool):
        msgs = []
        try:
            if block:
                self.conn.poll(None)  # idle: wait for work (or EOF)
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "close":
                    return None
                _, adds, aborts = msg
                msgs += [("add", rid, req) for rid, req in adds] + [("abort", rid, None) for rid in aborts]
        except (EOFError, OSError):
            return None
        return msgs

    def has_message(self) -> bool:
        return self.conn.poll()

    def taken(self) -> None:
        self.conn.send(("stats", self.engine.stats.snapshot(self.engine)))

    def deliver(self, outcomes, steps: int, longest_step_s: float) -> None:
        now = time.monotonic()
        if not outcomes and now - self.last_sent < TICK_S:
            return
        wire = [(rid, c, None if e is None else ("request" if isinstance(e, RequestError) else "engine", str(e)))
                for rid, c, e in outcomes]
        self.conn.send(("done", wire, longest_step_s, self.engine.stats.snapshot(self.engine)))
        self.last_sent = now


def _die_with_parent(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before prctl (the worker itself may be PID 1 in a container)
        os._exit(1)


def _build(spec: EngineSpec) -> Engine:
    engine_foreground()  # before torch starts its threads, which inherit the policy
    if spec.cpus:  # before torch starts its threads, which inherit it
        os.sched_setaffinity(0, spec.cpus)
    if spec.threads:
        import torch
        torch.set_num_threads(int(spec.threads))
    from ..presets import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer(spec.model, spec.dtype, spec.device)
    return Engine(model, tokenizer, spec.config)


def serve(conn: Connection) -> None:
    """The child: build the engine, then run the engine loop over the socket."""
    try:
        kind, spec = conn.recv()
        engine = _build(spec)
    except (EOFError, OSError):
        return
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", engine.max_model_len))
    try:
        run_loop(engine, _SocketTransport(conn, engine))
    except (EOFError, OSError):  # the parent is gone
        pass


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[2]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s engine-process %(levelname)s %(message)s")
    serve(Connection(int(sys.argv[1])))
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing to save, and extension modules report "leaks" at exit
