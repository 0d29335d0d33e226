"""Input Parquet files on any pyarrow filesystem: resolving a path, directory or glob, reading metadata, and reading
shards as a forward stream so a file is never held whole in memory."""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass

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


def list_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """Sorted Parquet file paths for a file, a directory (its *.parquet files, skipping _ and . names) or a glob."""
    fs, path = filesystem(uri)
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
            paths = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                     and not i.base_name.startswith(("_", "."))]
            kind = "directory"
        else:
            paths, kind = [path], "file"
    if not paths:
        raise ConfigError(f"input {uri!r}: no Parquet files match this {kind} (expected *.parquet files)")
    return fs, sorted(paths)


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
