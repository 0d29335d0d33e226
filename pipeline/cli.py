"""`phi3-batch`: `run` a Parquet job (a YAML file and/or flags; flags win), and `queue` (the Redis workers) when
that part is installed."""
from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Optional

import typer

from .config import ConfigError, JobConfig, load_config

app = typer.Typer(help="Batch inference for Phi-3 models.", no_args_is_help=True, add_completion=False)

try:
    from .queue_cli import queue_app
    app.add_typer(queue_app, name="queue")
except ImportError:  # the queue workers are optional
    pass


@app.callback()
def _group() -> None:
    """Batch inference for Phi-3 models: Parquet jobs on Ray."""


def _h(key: str, extra: str = "") -> str:
    field = JobConfig.model_fields[key]
    default = "" if field.is_required() else f" [default: {field.get_default(call_default_factory=True)!r}]"
    return f"{field.description}{extra}{default} (config key: {key})"


def _list(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _number(text: Optional[str], key: str):
    if text is None or text == "auto":
        return text
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')} {text!r}: expected 'auto' or a number") from None


def _stop_ids(text: Optional[str]):
    if text is None or text in ("auto", "none"):
        return text
    try:
        return [int(t) for t in _list(text)]
    except ValueError:
        raise ConfigError(f"--stop-token-ids {text!r}: expected auto, none or comma-separated token ids") from None


def _options(pairs: Optional[list[str]]) -> Optional[dict]:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--engine-option {pair!r}: expected KEY=VALUE, e.g. max_num_seqs=64")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
def run(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file with the job's keys; flags "
                                                                          "given here override it")] = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help=_h("input"))] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help=_h("output"))] = None,
    model: Annotated[Optional[str], typer.Option(help=_h("model"))] = None,
    backend: Annotated[Optional[str], typer.Option(help=_h("backend"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_h("dtype"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_h("device"))] = None,
    engine_option: Annotated[Optional[list[str]], typer.Option(
        help=_h("engine_options", "; KEY=VALUE, repeatable"))] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help=_h("prompt_column"))] = None,
    messages_column: Annotated[Optional[str], typer.Option(help=_h("messages_column"))] = None,
    id_column: Annotated[Optional[str], typer.Option(help=_h("id_column"))] = None,
    keep_columns: Annotated[Optional[str], typer.Option(help=_h("keep_columns", "; comma-separated"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_h("max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_h("temperature"))] = None,
    top_k: Annotated[Optional[int], typer.Option(help=_h("top_k"))] = None,
    top_p: Annotated[Optional[float], typer.Option(help=_h("top_p"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_h("seed"))] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help=_h("stop", "; repeatable"))] = None,
    stop_token_ids: Annotated[Optional[str], typer.Option(help=_h("stop_token_ids", "; ids comma-separated"))] = None,
    strip_prompt: Annotated[Optional[bool], typer.Option("--strip-prompt/--no-strip-prompt",
                                                         help=_h("strip_prompt"))] = None,
    shard_rows: Annotated[Optional[int], typer.Option(help=_h("shard_rows"))] = None,
    actors: Annotated[Optional[str], typer.Option(help=_h("actors"))] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(help=_h("gpus_per_actor"))] = None,
    cpus_per_actor: Annotated[Optional[str], typer.Option(help=_h("cpus_per_actor"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_h("batch_size"))] = None,
    shards_per_actor: Annotated[Optional[int], typer.Option(help=_h("shards_per_actor"))] = None,
    max_attempts: Annotated[Optional[int], typer.Option(help=_h("max_attempts"))] = None,
    stall_timeout_s: Annotated[Optional[float], typer.Option("--stall-timeout", help=_h("stall_timeout_s"))] = None,
    address: Annotated[Optional[str], typer.Option(help=_h("address"))] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help=_h("overwrite"))] = None,
    retry_errors: Annotated[Optional[bool], typer.Option(
        "--retry-errors", help=_h("retry_errors", "; a refused change is an error naming each key with its old and "
                                  "new value, before anything is written"))] = None,
    progress: Annotated[Optional[str], typer.Option(help=_h("progress"))] = None,
    log_every_s: Annotated[Optional[float], typer.Option(help=_h("log_every_s"))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (files, shards, rows, actors) and "
                                                            "exit without running anything")] = False,
) -> None:
    """Generate a completion for every row of the input Parquet files; write one Parquet file per input file.

    Rerunning the same command resumes: finished shards are skipped. Adding --retry-errors to the command of a
    finished job recomputes only its rows with an `error` (e.g. with a longer --engine-option max_model_len=...).
    Exit status: 0 when every shard finished (rows may still carry an `error`), 1 when shards failed or the engine
    could not start, 2 for a bad configuration or input (or a retry refused).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("phi3_batch").setLevel(logging.INFO)
    try:
        flags = dict(input=input, output=output, model=model, backend=backend, dtype=dtype, device=device,
                     engine_options=_options(engine_option), prompt_column=prompt_column,
                     messages_column=messages_column, id_column=id_column, keep_columns=_list(keep_columns),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop=stop or None, stop_token_ids=_stop_ids(stop_token_ids), strip_prompt=strip_prompt,
                     shard_rows=shard_rows, actors=_number(actors, "actors"), gpus_per_actor=gpus_per_actor,
                     cpus_per_actor=_number(cpus_per_actor, "cpus_per_actor"), batch_size=batch_size,
                     shards_per_actor=shards_per_actor, max_attempts=max_attempts,
                     stall_timeout_s=stall_timeout_s, address=address, overwrite=overwrite,
                     retry_errors=retry_errors, progress=progress, log_every_s=log_every_s)
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
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo("\n".join(summary.lines()))
    if not summary.ok:
        typer.echo(f"error: {len(summary.failed_shards)} shard(s) failed: "
                   f"{', '.join(f['key'] for f in summary.failed_shards)}", err=True)
        raise typer.Exit(1)


def _describe(job: JobConfig) -> str:
    from .plan import make_plan
    plan = make_plan(job)
    if not job.retry_errors:
        return plan.describe()
    from .manifest import Manifest
    from .retry import preview
    from .sink import Sink
    from .source import filesystem
    sink = Sink(*filesystem(job.output))
    return plan.describe() + "\n" + preview(plan, sink, Manifest.read(sink.fs, sink.dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
