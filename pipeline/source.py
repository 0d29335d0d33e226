"""Input Parquet files on any pyarrow filesystem: resolving a path, directory or glob, reading metadata, and reading
shards as a forward stream so a file is never held whole in memory. OpenAI batch files (JSONL) are the exception:
each is read whole and parsed into a table of its lines when the job is planned (pipeline/openai_input.py)."""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import ConfigError
from .shards import Shard

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputFile:
    path: str                 # path inside the filesystem
    name: str                 # base name, also the output file's name
    rows: int
    size: int                 # bytes
    row_groups: list[int]     # rows per row group
    schema: pa.Schema
    table: pa.Table | None = field(default=None, compare=False, repr=False)  # a JSONL file's rows, parsed

    def identity(self) -> dict:
        return {"path": self.path, "rows": self.rows, "size": self.size}


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); a plain path is local and made absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ConfigError(f"input/output {uri!r}: no filesystem for it ({e})") from None


SUFFIXES = {"parquet": ".parquet", "openai": ".jsonl"}


def list_files(uri: str, fmt: str = "parquet") -> tuple[pafs.FileSystem, list[str]]:
    """Sorted input file paths for a file, a directory (its *.parquet or, for fmt openai, *.jsonl files, skipping
    _ and . names) or a glob."""
    fs, path = filesystem(uri)
    suffix = SUFFIXES[fmt]
    if any(c in path for c in GLOB_CHARS):
        parts = path.split("/")
        fixed = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
        base = "/".join(parts[:fixed]) or "/"
        depth = len(parts) - fixed
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=depth > 1 or "**" in path))
        except OSError as e:
            raise ConfigError(f"input {uri!r}: cannot list {base}: {e}") from None
        paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
                 and (path.count("/") == i.path.count("/") or "**" in path)]
        kind = "glob"
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"input {uri!r} does not exist")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path))
            paths = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                     and not i.base_name.startswith(("_", "."))]
            kind = "directory"
        else:
            paths, kind = [path], "file"
    if not paths:
        what = "OpenAI batch" if fmt == "openai" else "Parquet"
        raise ConfigError(f"input {uri!r}: no {what} files match this {kind} (expected *{suffix} files)")
    return fs, sorted(paths)


def input_format(uri: str, fmt: str) -> str:
    """What input_format auto means for `uri`: openai for a path or glob ending in .jsonl, or a directory holding
    *.jsonl files and no *.parquet ones; else parquet."""
    if fmt != "auto":
        return fmt
    fs, path = filesystem(uri)
    if path.endswith(".jsonl"):
        return "openai"
    if any(c in path for c in GLOB_CHARS) or fs.get_file_info(path).type != pafs.FileType.Directory:
        return "parquet"
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]
    return "openai" if any(n.endswith(".jsonl") for n in names) and not any(
        n.endswith(".parquet") for n in names) else "parquet"


def describe_jsonl(fs: pafs.FileSystem, path: str, config) -> InputFile:
    """An OpenAI batch file, read whole and parsed into its table of lines (pipeline/openai_input.py)."""
    from .openai_input import read_table
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"input file {path} cannot be read: {e}") from None
    table = read_table(data, path, config.served_name, config.request_defaults())
    return InputFile(path, posixpath.basename(path), table.num_rows, len(data), [table.num_rows], table.schema,
                     table)


def describe_file(fs: pafs.FileSystem, path: str) -> InputFile:
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
            size = f.size()
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"input file {path} is not readable Parquet: {e}") from None
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return InputFile(path, posixpath.basename(path), meta.num_rows, size, groups, schema)


class _Cursor:
    """A forward stream over one file's rows from `position` on."""

    def __init__(self, fs: pafs.FileSystem, file: InputFile, columns: list[str], start: int, batch_rows: int):
        self.handle = fs.open_input_file(file.path)
        reader = pq.ParquetFile(self.handle, page_checksum_verification=True)
        group = offset = 0
        while group < len(file.row_groups) - 1 and offset + file.row_groups[group] <= start:
            offset += file.row_groups[group]
            group += 1
        self.batches = reader.iter_batches(batch_size=batch_rows, columns=columns,
                                           row_groups=range(group, len(file.row_groups)))
        self.position = offset
        self.pending: pa.Table | None = None
        self.take(start - offset)

    def take(self, n: int) -> pa.Table:
        pieces, have = [], 0
        if self.pending is not None:
            pieces.append(self.pending)
            have = self.pending.num_rows
            self.pending = None
        while have < n:
            batch = next(self.batches)
            pieces.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0] if pieces else None
        if table is not None and table.num_rows > n:
            self.pending = table.slice(n)
            table = table.slice(0, n)
        self.position += n
        return table

    def close(self):
        self.handle.close()


class ShardReader:
    """Reads shards in any order; shards asked for in file order stream forward without re-reading."""

    def __init__(self, fs: pafs.FileSystem, files: list[InputFile], columns: dict[int, list[str]], batch_rows: int):
        self.fs, self.files, self.columns, self.batch_rows = fs, files, columns, max(1, min(batch_rows, 65536))
        self._cursors: dict[int, _Cursor] = {}

    def read(self, shard: Shard) -> pa.Table:
        file = self.files[shard.file]
        if file.table is not None:
            return file.table.select(self.columns[shard.file]).slice(shard.start, shard.rows).combine_chunks()
        cursor = self._cursors.get(shard.file)
        if cursor is None or cursor.position != shard.start:
            if cursor is not None:
                cursor.close()
            cursor = self._cursors[shard.file] = _Cursor(self.fs, file, self.columns[shard.file], shard.start,
                                                         self.batch_rows)
        try:
            table = cursor.take(shard.rows)
        except BaseException:
            cursor.close()
            del self._cursors[shard.file]
            raise
        if shard.stop >= file.rows:
            cursor.close()
            del self._cursors[shard.file]
        return table.combine_chunks()

    def close(self):
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()
