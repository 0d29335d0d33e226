"""`phi3-batch`: `run` a Parquet job (a YAML file and/or flags; flags win), and `queue` (the Redis workers)."""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import types
import typing
from typing import Annotated, Any, Optional

import typer

from phi3_model.engine.sampling_params import SamplingParams

from workers.backend_options import OptionError, option_pairs

from .config import ConfigError, JobConfig, load_config
from .queue_cli import queue_app

app = typer.Typer(help="Batch inference for Phi-3 models.", no_args_is_help=True, add_completion=False)

app.add_typer(queue_app, name="queue")


@app.callback()
def _group() -> None:
    """Batch inference for Phi-3 models: Parquet jobs on Ray."""


INPUT, OUTPUT, ENGINE, SAMPLING, EXECUTION, CLUSTER = ("Input", "Output", "Model and engine", "Sampling",
                                                      "Execution", "Cluster")


def _shown(value) -> str:
    """A default as the YAML key takes it."""
    if value is None or value in ([], (), {}):
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _o(key: str, *decls: str, panel: str, extra: str = "") -> typer.models.OptionInfo:
    """The option of config key `key`: its description, its default as the job would run with it, its panel. Flags
    default to None (not given), so a config file's value is not overridden by a flag's default."""
    field = JobConfig.model_fields[key]
    default = ("required: here or in --config" if field.is_required()
               else _shown(field.get_default(call_default_factory=True)))
    return typer.Option(*decls, help=f"{field.description}{extra} (config key: {key})", show_default=default,
                        rich_help_panel=panel)


def _engine_options(pairs: Optional[list[str]]) -> Optional[dict]:
    try:
        return option_pairs(pairs, "--engine-option") or None
    except OptionError as e:
        raise ConfigError(str(e)) from None


def _list(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _number(text: Optional[str], key: str):
    if text is None or text == "auto":
        return text
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')} {text!r}: expected 'auto' or a number") from None


def _flag_kind(annotation) -> type:
    """How a request field is given on the command line: int, float, bool, str as themselves, a list of strings
    as a repeatable flag, anything else (token id lists, stop_token_ids, logit_bias, json_schema) as text: JSON, or
    comma-separated values."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    if len(args) == 1 and args[0] in (int, float, bool, str):
        return args[0]
    if len(args) == 1 and typing.get_origin(args[0]) is tuple and typing.get_args(args[0])[0] is str:
        return list[str]
    return _TEXT


class _TEXT(str):
    pass


def _request_value(key: str, value):
    """A request flag's value as the config key takes it."""
    if value is None or _flag_kind(SamplingParams.model_fields[key].annotation) is not _TEXT:
        return value or None if isinstance(value, list) else value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    items = _list(value)
    if len(items) == 1 and not items[0].lstrip("-").isdigit():
        return items[0]   # a word: auto, none
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')} {value!r}: expected JSON or comma-separated token ids "
                          f"[{SamplingParams.model_fields[key].description}]") from None


def _request_flags() -> list[inspect.Parameter]:
    """One flag per field of the request vocabulary (SamplingParams), named, typed and documented by it."""
    out = []
    for key, field in SamplingParams.model_fields.items():
        kind, flag = _flag_kind(field.annotation), "--" + key.replace("_", "-")
        decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        extra = {list[str]: "; repeatable", _TEXT: "; JSON" if "dict" in str(field.annotation)
                 else "; JSON, or comma-separated"}.get(kind, "")
        option = _o(key, *decls, panel=SAMPLING, extra=extra)
        annotation = Annotated[Optional[str if kind is _TEXT else kind], option]
        out.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return out


def run(
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", help="YAML file with the job's keys; flags given here override it", show_default="none",
        rich_help_panel=INPUT)] = None,
    input: Annotated[Optional[str], _o("input", "--input", "-i", panel=INPUT)] = None,
    input_format: Annotated[Optional[str], _o("input_format", panel=INPUT)] = None,
    prompt_column: Annotated[Optional[str], _o("prompt_column", panel=INPUT)] = None,
    messages_column: Annotated[Optional[str], _o("messages_column", panel=INPUT)] = None,
    id_column: Annotated[Optional[str], _o("id_column", panel=INPUT)] = None,
    shard_rows: Annotated[Optional[int], _o("shard_rows", panel=INPUT)] = None,
    output: Annotated[Optional[str], _o("output", "--output", "-o", panel=OUTPUT)] = None,
    keep_columns: Annotated[Optional[str], _o("keep_columns", panel=OUTPUT, extra="; comma-separated")] = None,
    strip_prompt: Annotated[Optional[bool], _o("strip_prompt", "--strip-prompt/--no-strip-prompt",
                                               panel=OUTPUT)] = None,
    overwrite: Annotated[Optional[bool], _o("overwrite", "--overwrite", panel=OUTPUT)] = None,
    retry_errors: Annotated[Optional[bool], _o(
        "retry_errors", "--retry-errors", panel=OUTPUT, extra="; a refused change is an error naming each key with "
        "its old and new value, before anything is written")] = None,
    model: Annotated[Optional[str], _o("model", panel=ENGINE)] = None,
    model_name: Annotated[Optional[str], _o("model_name", panel=ENGINE)] = None,
    backend: Annotated[Optional[str], _o("backend", panel=ENGINE)] = None,
    dtype: Annotated[Optional[str], _o("dtype", panel=ENGINE)] = None,
    device: Annotated[Optional[str], _o("device", panel=ENGINE)] = None,
    engine_option: Annotated[Optional[list[str]], _o("engine_options", panel=ENGINE,
                                                     extra="; NAME=VALUE, repeatable")] = None,
    stall_timeout_s: Annotated[Optional[float], _o("stall_timeout_s", "--stall-timeout", panel=ENGINE)] = None,
    batch_size: Annotated[Optional[int], _o("batch_size", panel=EXECUTION)] = None,
    shards_per_actor: Annotated[Optional[int], _o("shards_per_actor", panel=EXECUTION)] = None,
    max_attempts: Annotated[Optional[int], _o("max_attempts", panel=EXECUTION)] = None,
    progress: Annotated[Optional[str], _o("progress", panel=EXECUTION)] = None,
    log_every_s: Annotated[Optional[float], _o("log_every_s", panel=EXECUTION)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the plan (files, shards, rows, ids, what a rerun keeps, the actors that would "
        "start) and exit without writing or starting anything", show_default="false",
        rich_help_panel=EXECUTION)] = False,
    address: Annotated[Optional[str], _o("address", panel=CLUSTER)] = None,
    actors: Annotated[Optional[str], _o("actors", panel=CLUSTER)] = None,
    gpus_per_actor: Annotated[Optional[float], _o("gpus_per_actor", panel=CLUSTER)] = None,
    cpus_per_actor: Annotated[Optional[str], _o("cpus_per_actor", panel=CLUSTER)] = None,
    **request: Any,  # one flag per request field: see _request_flags
) -> None:
    """Generate a completion for every row of the input Parquet files; write one Parquet file per input file.
    OpenAI batch files (*.jsonl) give name.jsonl and name.errors.jsonl per input file instead.

    Rerunning the same command resumes: finished shards are skipped. Adding --retry-errors to the command of a
    finished job recomputes only its rows with an `error` (e.g. with a longer --engine-option max_model_len=...).
    Exit status: 0 when every shard finished (rows may still carry an `error`), 1 when shards failed or the engine
    could not start, 2 for a bad configuration or input (or a retry refused).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("phi3_batch").setLevel(logging.INFO)
    try:
        flags = dict(input=input, input_format=input_format, model_name=model_name, output=output, model=model, backend=backend, dtype=dtype, device=device,
                     engine_options=_engine_options(engine_option), prompt_column=prompt_column,
                     messages_column=messages_column, id_column=id_column, keep_columns=_list(keep_columns),
                     strip_prompt=strip_prompt,
                     shard_rows=shard_rows, actors=_number(actors, "actors"), gpus_per_actor=gpus_per_actor,
                     cpus_per_actor=_number(cpus_per_actor, "cpus_per_actor"), batch_size=batch_size,
                     shards_per_actor=shards_per_actor, max_attempts=max_attempts,
                     stall_timeout_s=stall_timeout_s, address=address, overwrite=overwrite,
                     retry_errors=retry_errors, progress=progress, log_every_s=log_every_s,
                     **{k: _request_value(k, v) for k, v in request.items()})
        job = load_config(config, flags)
        if dry_run:
            typer.echo(_describe(job))
            return
        from .driver import JobError, run as drive
        try:
            summary = drive(job)
        except JobError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            _interrupted()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo("\n".join(summary.lines()))
    if not summary.ok:
        typer.echo(f"error: {len(summary.failed_shards)} shard(s) failed: "
                   f"{', '.join(f['key'] for f in summary.failed_shards)}", err=True)
        raise typer.Exit(1)


def _with_request_flags(fn):
    """fn's signature (annotations resolved) with **request replaced by the request vocabulary's flags."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD] + _request_flags()
    fn.__signature__ = inspect.Signature(params, return_annotation=None)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


app.command()(_with_request_flags(run))


def _interrupted() -> None:
    """Ctrl-C: the job's finally blocks have run (actors ended, a local Ray stopped whole), so end here without
    the interpreter's teardown, where a Ray core worker interrupted mid-construction crashes (SIGSEGV)."""
    typer.echo("error: interrupted; finished shards are kept: rerun the same command to resume", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _describe(config: JobConfig) -> str:
    """The plan, what this run would do in the output directory (resume, retry), and the actors it would start:
    the checks of a real run, without writing or starting anything."""
    from .actors import describe
    from .driver import Job, claim_output
    from .plan import make_plan
    from .retry import load, preview
    from .sink import Sink
    from .source import filesystem
    plan = make_plan(config)
    sink = Sink(*filesystem(config.output))
    found, manifest = claim_output(plan, sink)
    job = Job(plan, sink, manifest, load(plan, sink) if config.retry_errors else None)
    lines = [plan.describe()]
    if config.retry_errors:
        lines.append(preview(plan, sink, found))
    elif len(job.todo) < len(plan.shards):
        lines.append(f"resume  {len(plan.shards) - len(job.todo)} shard(s) finished by an earlier run are kept; "
                     f"{len(job.todo)} to run")
    lines.append(describe(config, len(job.todo)) if job.todo else "actors  none: nothing left to run")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
