"""A job's plan: its input files, their shards, the columns read and written. Built from metadata alone, and checked
before anything is written: a missing column or unreadable file stops the job with the output untouched."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from workers.rows import OVERRIDES, RESULT_SCHEMA

from .config import ConfigError, JobConfig
from .shards import Shard, cut
from .source import InputFile, describe_file, list_files


@dataclass
class Plan:
    config: JobConfig
    fs: pafs.FileSystem
    files: list[InputFile]
    shards: list[Shard]
    read_columns: dict[int, list[str]]     # file index -> columns read from it
    row_columns: dict[int, list[str]]      # file index -> columns the engine actors need
    schemas: dict[int, pa.Schema]          # file index -> output schema
    fingerprint: str

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def shards_of(self, file: int) -> list[Shard]:
        return [s for s in self.shards if s.file == file]

    def describe(self) -> str:
        c = self.config
        lines = [f"input   {c.input}: {len(self.files)} file(s), {self.rows} rows, {len(self.shards)} shard(s) "
                 f"of about {c.shard_rows} rows"]
        for i, f in enumerate(self.files):
            lines.append(f"  {f.name:<32} {f.rows:>10} rows {len(f.row_groups):>5} row group(s) "
                         f"{len(self.shards_of(i)):>6} shard(s)")
        actors = c.actors if c.actors != "auto" else ("auto: cluster GPUs / gpus_per_actor" if c.gpus_per_actor
                                                      else "auto: 1")
        lines += [f"output  {c.output} (job {self.fingerprint})",
                  f"engine  {c.backend} {c.model} dtype={c.dtype} device={c.device}",
                  f"actors  {actors}, {c.gpus_per_actor:g} GPU and {c.cpus_per_actor} CPU each, "
                  f"{c.batch_size} requests and {c.shards_per_actor} shards in flight per actor"]
        return "\n".join(lines)


def output_schema(file: InputFile, config: JobConfig) -> pa.Schema:
    fields = []
    for name in config.kept:
        if name == "id" and config.id_column is None:
            fields.append(pa.field("id", pa.string()))
        elif name == "id":
            fields.append(file.schema.field(config.id_column).with_name("id"))
        else:
            fields.append(file.schema.field(name))
    return pa.schema(fields + list(RESULT_SCHEMA))


def check_columns(file: InputFile, config: JobConfig) -> None:
    names = file.schema.names
    where = f"input file {file.path}"
    source = config.source_column
    if source not in names:
        hint = ("; for chat input set messages_column" if config.messages_column is None and "messages" in names
                else "; set prompt_column to the column holding the prompts")
        raise ConfigError(f"{where} has no column {source!r} (columns: {', '.join(names)}){hint}")
    if config.messages_column and not pa.types.is_list(file.schema.field(source).type) \
            and not pa.types.is_large_list(file.schema.field(source).type):
        raise ConfigError(f"{where}: column {source!r} is {file.schema.field(source).type}; messages must be a "
                          f"list of {{role, content}} structs")
    if config.id_column is not None and config.id_column not in names:
        raise ConfigError(f"{where} has no id column {config.id_column!r} (columns: {', '.join(names)})")
    for name in config.kept:
        if name == "id":
            if config.id_column is None and "id" in names:
                raise ConfigError(f"{where} has its own 'id' column; set id_column: id to use it as the row id, or "
                                  f"leave 'id' out of keep_columns")
        elif name not in names:
            raise ConfigError(f"{where} has no column {name!r} to keep (columns: {', '.join(names)})")
        elif name in RESULT_SCHEMA.names:
            raise ConfigError(f"{where}: kept column {name!r} would collide with the output column of that name")
    if len(set(config.kept)) != len(config.kept):
        raise ConfigError(f"keep_columns lists a column twice: {config.kept}")


def make_plan(config: JobConfig) -> Plan:
    fs, paths = list_files(config.input)
    files = [describe_file(fs, p) for p in paths]
    seen: dict[str, str] = {}
    for f in files:
        if f.name in seen:
            raise ConfigError(f"input files {seen[f.name]} and {f.path} share the base name {f.name!r}; outputs are "
                              f"named after inputs, so base names must be unique")
        seen[f.name] = f.path
        check_columns(f, config)
    shards, read_columns, row_columns, schemas = [], {}, {}, {}
    for i, f in enumerate(files):
        shards += cut(i, f.name, f.row_groups, config.shard_rows)
        row_cols = [c for c in (config.source_column,) + OVERRIDES if c in f.schema.names]
        kept = [config.id_column if c == "id" else c for c in config.kept if c != "id" or config.id_column]
        row_columns[i] = row_cols
        read_columns[i] = list(dict.fromkeys(row_cols + kept))
        schemas[i] = output_schema(f, config)
    fingerprint = config.fingerprint([f.identity() for f in files])
    return Plan(config, fs, files, shards, read_columns, row_columns, schemas, fingerprint)
