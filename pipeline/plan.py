"""A job's plan: its input files, their shards, the columns read and written. Built from metadata alone, and checked
before anything is written: a missing column or unreadable file stops the job with the output untouched."""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from workers.openai_batch import errors_name

from .columns import check_columns, id_column, kept_read, output_schema
from .config import ConfigError, JobConfig
from .shards import Shard, cut
from .source import InputFile, describe_file, describe_jsonl, filesystem, input_format, list_files


@dataclass
class Plan:
    config: JobConfig
    fs: pafs.FileSystem
    files: list[InputFile]
    shards: list[Shard]
    read_columns: dict[int, list[str]]     # file index -> columns read from it
    row_columns: dict[int, list[str]]      # file index -> columns the engine actors need
    schemas: dict[int, pa.Schema]          # file index -> output schema
    id_columns: dict[int, str | None]      # file index -> column of row ids (None: '<file name>:<row index>')
    fingerprint: str

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def recorded_config(self) -> dict:
        """The configuration as the manifest records it and a retry compares it: id_column as resolved here."""
        return dict(self.config.model_dump(mode="json"), id_column=resolved_id_column(self.config, self.id_columns))

    @property
    def openai(self) -> bool:
        return self.config.input_format == "openai"

    def outputs(self, file: int) -> list[str]:
        """The output file names of input file `file` (OpenAI input: name.jsonl and its error file)."""
        name = self.files[file].name
        return [name, errors_name(name)] if self.openai else [name]

    def shards_of(self, file: int) -> list[Shard]:
        return [s for s in self.shards if s.file == file]

    def describe(self) -> str:
        c = self.config
        lines = [f"input   {c.input}: {len(self.files)} file(s), {self.rows} rows, {len(self.shards)} shard(s) "
                 f"of about {c.shard_rows} rows"]
        for i, f in enumerate(self.files):
            lines.append(f"  {f.name:<32} {f.rows:>10} rows {len(f.row_groups):>5} row group(s) "
                         f"{len(self.shards_of(i)):>6} shard(s)")
        ids = sorted({f"column {v!r}" if v else "'<file name>:<row index>'" for v in self.id_columns.values()})
        if self.openai:
            bad = sum(f.table.column("line_error").length() - f.table.column("line_error").null_count
                      for f in self.files)
            lines.append(f"format  OpenAI batch lines: ids are custom_id; {bad} line(s) that cannot run go to the "
                         f"error files; output name.jsonl and name.errors.jsonl per input file")
        else:
            lines.append(f"ids     {', '.join(ids)} (id_column {'null' if c.id_column is None else c.id_column})")
        lines += [f"output  {c.output} (job {self.fingerprint})",
                  f"engine  {c.backend} {c.model} dtype={c.dtype} device={c.device}",
                  f"request {self.describe_request()}"]
        return "\n".join(lines)

    def describe_request(self) -> str:
        """The job's request defaults that differ from the vocabulary's, and the columns that override them."""
        given = c.request_defaults().model_dump(mode="json", exclude_defaults=True) if (c := self.config) else {}
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in given.items()) or "the request defaults (SamplingParams)"
        columns = sorted({col for cols in self.row_columns.values() for col in cols if col != c.source_column})
        return text + (f"; per-row columns: {', '.join(columns)}" if columns else "")


def check_output_location(fs: pafs.FileSystem, files: list[InputFile], config: JobConfig) -> None:
    """Refuse an output directory that is or holds an input file, at any depth: the job writes, replaces
    (--overwrite) and sweeps files there, and an output named like its input would land on it."""
    out_fs, out = filesystem(config.output)
    if out_fs.type_name != fs.type_name:
        return
    norm = os.path.realpath if out_fs.type_name == "local" else posixpath.normpath
    out = norm(out)
    for f in files:
        path = norm(f.path)
        if path == out or path.startswith(out.rstrip("/") + "/"):
            what = "is" if path == out else "holds"
            raise ConfigError(f"output {config.output} {what} the input file {f.path}: the job's files there would "
                              f"replace or remove it; choose an --output outside the input's directories")


def make_plan(config: JobConfig) -> Plan:
    fmt = input_format(config.input, config.input_format)
    if fmt == "openai" and config.input_format != "openai":   # the plan's config says what auto resolved to
        try:
            config.check_openai()
        except ValueError as e:
            raise ConfigError(f"input {config.input} is OpenAI batch input: {e}") from None
        config = config.model_copy(update=dict(input_format="openai"))
    fs, paths = list_files(config.input, fmt)
    files = [describe_jsonl(fs, p, config) if fmt == "openai" else describe_file(fs, p) for p in paths]
    check_output_location(fs, files, config)
    seen: dict[str, str] = {}
    for f in files:
        if f.name in seen:
            raise ConfigError(f"input files {seen[f.name]} and {f.path} share the base name {f.name!r}; outputs are "
                              f"named after inputs, so base names must be unique")
        seen[f.name] = f.path
        if fmt == "parquet":
            check_columns(f, config)
    shards, read_columns, row_columns, schemas, ids = [], {}, {}, {}, {}
    for i, f in enumerate(files):
        shards += cut(i, f.name, f.row_groups, config.shard_rows)
        row_cols = [c for c in config.row_spec().columns if c in f.schema.names]
        row_columns[i] = row_cols
        read_columns[i] = list(dict.fromkeys(row_cols + kept_read(f, config)))
        schemas[i] = output_schema(f, config)
        ids[i] = id_column(f, config)
    fingerprint = config.fingerprint([f.identity() for f in files], id_column=resolved_id_column(config, ids),
                                     input_format=fmt)
    return Plan(config, fs, files, shards, read_columns, row_columns, schemas, ids, fingerprint)


def resolved_id_column(config: JobConfig, ids: dict[int, str | None]) -> str | None:
    """What id_column amounts to over these files: 'auto' resolves to the explicit setting that gives the same
    output ('id' or None), so the fingerprint of a job stays that of the same job configured explicitly (and of
    jobs run before 'auto' was the default); 'auto' only when it resolves differently from file to file."""
    if config.id_column != "auto":
        return config.id_column
    values = set(ids.values())
    return values.pop() if len(values) == 1 else "auto"
