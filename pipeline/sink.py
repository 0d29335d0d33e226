"""Output files: each finished shard is a part file under `_parts/`; when every shard of an input file is done the
parts are streamed, in row order, into the output file of the same base name. Every file appears by rename, whole.

Names starting with `_` or `.` are skipped by pyarrow/Ray Data dataset discovery, so the output directory reads
as a dataset of the output files alone.
"""
from __future__ import annotations

import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.rows import RESULT_SCHEMA

from .manifest import NAME as MANIFEST, write_atomic
from .shards import Shard

PARTS = "_parts"
SUMMARY = "_summary.json"


class Sink:
    def __init__(self, fs: pafs.FileSystem, directory: str):
        self.fs, self.dir = fs, directory

    def output_path(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    def part_path(self, shard: Shard) -> str:
        return posixpath.join(self.dir, PARTS, shard.name, f"{shard.index:06d}.parquet")

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def write_part(self, shard: Shard, table: pa.Table) -> None:
        path = self.part_path(shard)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        self._write_table(path, table)

    def parts(self) -> set[str]:
        """Paths of the part files present."""
        selector = pafs.FileSelector(posixpath.join(self.dir, PARTS), allow_not_found=True, recursive=True)
        return {i.path for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File
                and not i.base_name.startswith(".")}

    def shard_table(self, shard: Shard, output: pq.ParquetFile | None = None) -> pa.Table:
        """A shard's rows: its part when there is one, else its rows in the (open) output file, where a retry of
        the error rows leaves the shards it did not touch."""
        if output is None or self.exists(self.part_path(shard)):
            table = pq.read_table(self.part_path(shard), filesystem=self.fs)
        else:
            table = rows_of(output, shard.start, shard.stop)
        for f in RESULT_SCHEMA:  # a file written before this result column existed: null there
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table

    def open_output(self, name: str) -> pq.ParquetFile | None:
        path = self.output_path(name)
        return pq.ParquetFile(path, filesystem=self.fs) if self.exists(path) else None

    def assemble(self, name: str, shards: list[Shard], schema: pa.Schema) -> int:
        """Stream the parts of `shards` (in order) into the output file, a shard without a part copied from the
        file being replaced; returns its row count."""
        path = self.output_path(name)
        tmp = posixpath.join(self.dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        rows = 0
        current = self.open_output(name)
        try:
            with self.fs.open_output_stream(tmp) as out, pq.ParquetWriter(out, schema) as writer:
                for shard in shards:
                    table = self.shard_table(shard, current).cast(schema)
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
                    rows += table.num_rows
                if not shards:
                    writer.write_table(schema.empty_table())
        finally:
            if current is not None:
                current.close()
        self.fs.move(tmp, path)
        return rows

    def assemble_lines(self, names: list[str], shards: list[Shard], schema: pa.Schema, lines) -> int:
        """OpenAI output: the parts of `shards` (in order) as JSONL lines, names[0] the successful ones, names[1]
        the failed; lines(table) yields (ok, line). Both written under temporary names, then renamed; returns the
        row count."""
        paths = [self.output_path(n) for n in names]
        tmps = [posixpath.join(self.dir, f".{n}.tmp-{uuid.uuid4().hex[:8]}") for n in names]
        rows = 0
        with self.fs.open_output_stream(tmps[0]) as good, self.fs.open_output_stream(tmps[1]) as bad:
            for shard in shards:
                table = self.shard_table(shard).cast(schema)
                rows += table.num_rows
                for ok, line in lines(table):
                    (good if ok else bad).write(line.encode())
        for tmp, path in zip(tmps[::-1], paths[::-1]):   # the error file first: the output file appears last
            self.fs.move(tmp, path)
        return rows

    def drop_parts(self, name: str) -> None:
        path = posixpath.join(self.dir, PARTS, name)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        root = posixpath.join(self.dir, PARTS)
        if not self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if self.fs.get_file_info(root).type == pafs.FileType.Directory:
                self.fs.delete_dir(root)

    def write_summary(self, summary: dict) -> str:
        path = posixpath.join(self.dir, SUMMARY)
        write_atomic(self.fs, path, (json.dumps(summary, indent=2) + "\n").encode())
        return path

    def clear(self, names: list[str]) -> None:
        """Remove another job's manifest, parts, summary and the named outputs (overwrite)."""
        for name in [MANIFEST, SUMMARY] + names:
            if self.exists(self.output_path(name)):
                self.fs.delete_file(self.output_path(name))
        if self.fs.get_file_info(posixpath.join(self.dir, PARTS)).type == pafs.FileType.Directory:
            self.fs.delete_dir(posixpath.join(self.dir, PARTS))

    def sweep_temporaries(self) -> None:
        """Temporary files left by a crash mid-write."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True, recursive=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.startswith(".") and ".tmp-" in info.base_name:
                self.fs.delete_file(info.path)

    def _write_table(self, path: str, table: pa.Table) -> None:
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as out:
            pq.write_table(table, out)
        self.fs.move(tmp, path)


def rows_of(file: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of an open Parquet file, reading only the row groups they lie in."""
    groups, offset, first = [], 0, 0
    for g in range(file.metadata.num_row_groups):
        n = file.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            first = first if groups else offset
            groups.append(g)
        offset += n
    if not groups:
        return file.schema_arrow.empty_table()
    return file.read_row_groups(groups).slice(start - first, stop - start)


def generated_tokens(table: pa.Table) -> int:
    """Tokens the rows of a result table generated: every sample's (the top-level completion_tokens are sample 0's)."""
    if "samples" in table.column_names:
        samples = pc.list_flatten(table.column("samples"))
        return pc.sum(pc.struct_field(samples, "completion_tokens")).as_py() or 0
    return pc.sum(table.column("completion_tokens")).as_py() or 0


def part_stats(table: pa.Table) -> dict:
    """The counts a shard's manifest event records for its rows (RESULT_SCHEMA columns): completion_tokens counts
    the tokens generated, every sample's."""
    ok = table.column("error").null_count
    return dict(rows=table.num_rows, ok=ok, errors=table.num_rows - ok,
                prompt_tokens=pc.sum(table.column("prompt_tokens")).as_py() or 0,
                completion_tokens=generated_tokens(table))
