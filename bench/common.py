"""Shared benchmark plumbing: rows run in child processes (clean memory, one engine each), measured side by side
in one run, printed as one table and optionally written as JSON with stable row names."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("torch", "transformers", "vllm", "ray", "redis", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def measuring_thread() -> None:
    """The calling thread (a sampler beside the measured row) runs SCHED_BATCH where Linux has it: it then never
    preempts the row's engine when it wakes, it runs when a CPU is free or at the next tick. On 2 cores every
    wake-up that preempts one of the engine's two OpenMP threads stalls the other at the next barrier (issue 15)."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass


class PeakRSS:
    """Samples the resident memory of a process tree (children included) every 0.1 s. The tree is looked up once a
    second: finding children scans every process on the machine (3% of a core at 10 a second, taken from the row
    being measured on a 2-core machine), reading a known process's memory is one small file."""

    TREE_EVERY = 10  # samples

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        measuring_thread()
        procs, n = [self.proc], 0
        while not self._stop.is_set():
            if n % self.TREE_EVERY == 0:
                try:
                    procs = [self.proc] + self.proc.children(recursive=True)
                except psutil.Error:
                    pass
            n += 1
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # gone since the last lookup
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak / 2**20


def run_row(module: str, row: str, args: dict, timeout: float = 900) -> dict:
    """Run `python -m module --child row --args JSON` and return the dict it writes, plus peak_rss_mb."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [sys.executable, "-m", module, "--child", row, "--child-args", json.dumps(args), "--child-out", out_path]
    proc = subprocess.Popen(cmd)
    rss = PeakRSS(proc.pid)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    peak = rss.stop()
    try:
        with open(out_path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        result = {"error": f"row process exited {rc} without a result"}
    os.unlink(out_path)
    result.update(name=row, peak_rss_mb=round(peak, 1))
    return result


def run_rows_repeated(module: str, rows: list[str], args: dict, repeat: int, rate: str = "output_tokens_per_s",
                      on_row=None, before_row=None) -> list[dict]:
    """Every row `repeat` times, interleaved (row A, B, C, then A, B, C again...) so that a slow spell of this
    shared machine hits all rows alike. Each row reports its median run (by `rate`, or requests_per_s where the
    row has no `rate`), with every run's rate in `runs`. args gets `rep` (0..repeat-1): keep each run's state
    (queue names, files) apart with it. before_row(row): called before each run (e.g. to reset shared state)."""
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for rep in range(repeat):
        for row in rows:
            if before_row:
                before_row(row)
            runs[row].append(run_row(module, row, {**args, "rep": rep}))
            if on_row:
                on_row(runs[row][-1])
    out = []
    for row in rows:
        done = [r for r in runs[row] if not r.get("error")]
        if not done:
            out.append(runs[row][-1])
            continue
        key = rate if done[0].get(rate) else "requests_per_s"
        rounds = [None if r.get("error") else r.get(key) for r in runs[row]]
        done.sort(key=lambda r: r[key])
        out.append({**done[(len(done) - 1) // 2], "runs": [x for x in rounds if x is not None], "rounds": rounds,
                    "failed_runs": len(runs[row]) - len(done)})
    return out


def paired_ratio(row: dict, base: dict) -> float | None:
    """The median over rounds of row's rate / base's rate in the same round (run_rows_repeated's `rounds`; a round
    where either failed is left out). Beside the ratio of the two medians: rounds run their rows minutes apart, so a
    drift of the machine's speed between rounds (on a shared 2-core machine one row's runs differ by up to 30%)
    cancels in each round's ratio instead of landing in whichever row's median it happened to hit."""
    pairs = [a / b for a, b in zip(row.get("rounds") or [], base.get("rounds") or []) if a and b]
    return statistics.median(pairs) if pairs else None


def measure_child(fn, args: dict, out: str, requests: int | None = None) -> None:
    """Run one row in this (child) process and write its result with the derived rates; an exception becomes the
    row's error (reported in the table, the other rows still run)."""
    try:
        r = fn(args)
        n = r.get("requests", requests)
        r["requests_per_s"] = round(n / r["seconds"], 3) if n else None
        r["output_tokens_per_s"] = round(r["output_tokens"] / r["seconds"], 1) if r.get("output_tokens") else None
    except Exception as e:
        r = {"error": f"{type(e).__name__}: {e}"}
    write_child_result(out, r)


def write_child_result(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    base = next((r for r in rows if r.get("output_tokens_per_s")), None)
    print(f"\n{title}")
    headers = [h for _, h, _ in columns] + ["vs first"]
    table = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        ratio = "-"
        if base and r.get("output_tokens_per_s"):
            ratio = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
        cells.append(ratio if not r.get("error") else "error: " + str(r["error"])[:60])
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


def report(title: str, rows: list[dict], columns: list[tuple[str, str, str]], workload: dict,
           json_path: str | None) -> None:
    """The run's one table, and its JSON when asked for."""
    print_table(title, rows, columns)
    if json_path:
        write_json(json_path, rows, workload)


def write_json(path: str, rows: list[dict], workload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "workload": workload, "versions": versions()}, f, indent=2)


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (an engine's helper processes)."""
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Timer:
    """Wall seconds of a block, and the CPU seconds this process tree spent in it (cpu_seconds)."""

    def __enter__(self):
        self.cpu0 = tree_cpu_seconds()
        self.t0 = time.perf_counter()  # after the CPU reading: its cost stays out of the wall time
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = tree_cpu_seconds() - self.cpu0
