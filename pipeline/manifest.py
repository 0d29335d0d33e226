"""The output directory's record of a job: one JSON event per line, appended as work finishes.

The first line names the job (its fingerprint and configuration); then `shard` lines (done or failed, with counts)
and `file` lines (output file assembled). A rerun reads it to skip finished shards. A torn last line (a crash mid
write) is dropped on open.
"""
from __future__ import annotations

import json
import posixpath
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from .config import ConfigError

NAME = "_manifest.jsonl"


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Temporary name in the same directory, then rename: readers see the old bytes or the new, never half."""
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


class Manifest:
    def __init__(self, fs: pafs.FileSystem, directory: str, events: list[dict], fresh: bool = False,
                 torn: bool = False):
        self.fs, self.path, self.events = fs, posixpath.join(directory, NAME), events
        self.fresh, self.torn = fresh, torn
        self.run = uuid.uuid4().hex[:8]

    @classmethod
    def read(cls, fs: pafs.FileSystem, directory: str) -> "Manifest | None":
        text = _read_text(fs, posixpath.join(directory, NAME))
        if text is None:
            return None
        events, torn = [], False
        for line in text.splitlines(keepends=True):
            try:
                if not line.endswith("\n"):
                    raise ValueError(line)
                events.append(json.loads(line))
            except ValueError:
                torn = True
                break
        return cls(fs, directory, events, torn=torn)

    @classmethod
    def open(cls, fs: pafs.FileSystem, directory: str, fingerprint: str, job: dict, overwrite: bool) -> "Manifest":
        """This job's manifest: resumed if the directory holds the same job, else refused (or replaced with
        overwrite). Raises before writing anything."""
        found = cls.read(fs, directory)
        if found is not None and found.fingerprint == fingerprint:
            return found
        if found is not None and not overwrite:
            raise ConfigError(
                f"output directory {directory} holds another job's outputs (job {found.fingerprint}, this job "
                f"{fingerprint}: input files, model or row settings differ); pass --overwrite to replace them or "
                f"choose another --output")
        return cls(fs, directory, [dict(event="job", fingerprint=fingerprint, **job)], fresh=True)

    @property
    def fingerprint(self) -> str | None:
        return self.events[0].get("fingerprint") if self.events and self.events[0].get("event") == "job" else None

    @property
    def header(self) -> dict:
        return self.events[0]

    def shards(self) -> dict[str, dict]:
        """shard key -> its last event (done or failed)."""
        return {e["key"]: e for e in self.events if e.get("event") == "shard"}

    def done_files(self) -> set[str]:
        return {e["name"] for e in self.events if e.get("event") == "file"}

    def start(self) -> None:
        """Write a fresh job's header (replacing another job's manifest) or drop a torn last line."""
        if self.fresh or self.torn:
            self._rewrite()
            self.fresh = self.torn = False
        self.record(dict(event="run", run=self.run, started=time.time()))

    def record(self, event: dict) -> None:
        if event.get("event") != "run":
            event = dict(event, run=self.run)
        self.events.append(event)
        line = (json.dumps(event) + "\n").encode()
        try:
            with self.fs.open_append_stream(self.path) as f:
                f.write(line)
        except (pa.ArrowNotImplementedError, NotImplementedError):
            self._rewrite()   # object stores cannot append: rewrite the whole (small) file

    def _rewrite(self) -> None:
        write_atomic(self.fs, self.path, "".join(json.dumps(e) + "\n" for e in self.events).encode())
