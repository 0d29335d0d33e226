"""The job's one configuration model: a YAML file and/or command-line flags, validated in one place.

Unknown keys and bad values are errors naming the key and what is allowed. The request fields (every field of
SamplingParams, the one request vocabulary, with its defaults and help) are the job's defaults; per-row columns of
the same names override them row by row (see workers/rows.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from phi3_model.engine.sampling_params import SamplingParams
from workers.backend_options import OptionError, parse_options
from workers.rows import OVERRIDES as REQUEST_FIELDS, RowError, RowSpec, request_field, request_params

# What decides a row's output bytes besides the input files: the job's fingerprint, and the keys a retry of the
# error rows refuses to change (the rows it keeps were computed with them).
ROW_KEYS = ("model", "backend", "dtype", "prompt_column", "messages_column", "id_column", "keep_columns",
            "strip_prompt", "shard_rows", "input_format", "model_name") + REQUEST_FIELDS
# keys a job's fingerprint holds only when set otherwise (jobs run before they existed keep their fingerprint)
_LATER = {"input_format": ("auto", "parquet"), "model_name": (None,)}
# request fields a job's fingerprint always held; the others count only when set (old jobs keep their fingerprint)
_FINGERPRINTED = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids")
REQUEST_DEFAULTS = SamplingParams().model_dump(mode="json")


class ConfigError(ValueError):
    """A job configuration or input that cannot run; the message names the key or file and what would be right."""


class _Job(BaseModel):
    """JobConfig without the request fields (added from SamplingParams below)."""

    model_config = ConfigDict(extra="forbid")

    # what to read and where to write
    input: str = Field(..., description="Parquet file, directory or glob; local path or any pyarrow.fs URI (s3://, gs://, ...); "
                       "or OpenAI batch files (*.jsonl)")
    input_format: Literal["auto", "parquet", "openai"] = Field(
        "auto", description="parquet | openai (OpenAI Batch API JSONL: one request per line, output name.jsonl and "
        "name.errors.jsonl); auto: openai for *.jsonl input, else parquet")
    model_name: str | None = Field(None, description="openai input: the name each line's body.model must equal and "
                                   "the output bodies report (default: the model key); '*': accept any name, "
                                   "reported as given")
    output: str = Field(..., description="output directory (local path or URI); one Parquet file per input file")
    prompt_column: str = Field("prompt", description="column holding the prompt text")
    messages_column: str | None = Field(None, description="column of chat messages (list of {role, content}); "
                                                            "used instead of prompt_column when set")
    id_column: str | None = Field("auto", description="column holding row ids; auto: the input's 'id' column "
                                  "when it has one, else '<file name>:<row index>' (null: always the latter)")
    keep_columns: list[str] | None = Field(None, description="input columns copied to the output; 'id' is the row id "
                                                              "(default: id and the prompt or messages column)")
    # the engine
    model: str = Field(..., description="preset name, local checkpoint directory or hf://owner/name")
    backend: Literal["native", "vllm"] = Field("native", description="engine backend: native | vllm")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="the backend's engine options "
                                           "(native: block_size, num_blocks, kv_cache_bytes, max_num_seqs, "
                                           "max_num_batched_tokens, enable_prefix_caching, schedule, max_model_len, "
                                           "threads, process, cpus; vllm: see README, Backends)")
    strip_prompt: bool = Field(True, description="completion holds only the new text; false: prompt + new text")
    # execution
    shard_rows: int = Field(1000, ge=1, description="target rows per shard (a row group or a range of rows)")
    actors: int | Literal["auto"] = Field("auto", description="engine actors; auto: one per gpus_per_actor GPUs; "
                                          "without GPUs one per CPU (cpus_per_actor) while their engines fit in "
                                          "memory (one for vllm)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs each actor asks Ray for")
    cpus_per_actor: float | Literal["auto"] = Field("auto", description="CPUs each actor asks Ray for; auto: 1 with "
                                                                          "GPUs, else the cluster's CPUs / actors")
    batch_size: int = Field(256, ge=1, description="requests each actor keeps in flight on its engine")
    shards_per_actor: int = Field(2, ge=1, description="shards in flight per actor (backpressure)")
    max_attempts: int = Field(3, ge=1, description="tries per shard before it is recorded as failed")
    stall_timeout_s: float = Field(300.0, gt=0, description="an engine holding rows that completes no step for this "
                                   "long is declared hung: its actor exits, Ray restarts it, its shards are retried")
    address: str | None = Field(None, description="Ray cluster to join (auto, ray://host:port); none: start a "
                                                   "local Ray sized to the machine")
    overwrite: bool = Field(False, description="replace the outputs of a different job in the output directory")
    retry_errors: bool = Field(False, description="recompute only the rows whose error cell is set in the finished "
                                                  "job in the output directory, keeping every other row as it is; "
                                                  "accepts changed engine_options, device and execution settings, "
                                                  "refuses a change to the model, backend, dtype, columns, sampling "
                                                  "defaults, strip_prompt, shard_rows or input files")
    progress: Literal["auto", "bar", "log", "off"] = Field("auto", description="auto: a bar on a terminal, "
                                                                                "log lines otherwise")
    log_every_s: float = Field(10.0, gt=0, description="seconds between progress log lines")

    @field_validator("actors")
    @classmethod
    def _actors(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"actors must be 'auto' or at least 1, got {v}")
        return v

    @field_validator("cpus_per_actor")
    @classmethod
    def _cpus(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError(f"cpus_per_actor must be 'auto' or positive, got {v}")
        return v

    @model_validator(mode="after")
    def _openai(self):
        if self.input_format == "openai":
            self.check_openai()
        return self

    def check_openai(self) -> None:
        """What an OpenAI batch job cannot take (its prompts and ids are the lines', its text the new text)."""
        if self.retry_errors:
            raise ValueError("retry_errors is for Parquet outputs; rerun failed OpenAI lines as a new batch file")
        if not self.strip_prompt:
            raise ValueError("strip_prompt false does not apply to OpenAI input (a completion body holds the new "
                             "text only)")

    @model_validator(mode="after")
    def _retry(self):
        if self.retry_errors and self.overwrite:
            raise ValueError("retry_errors keeps the rows without an error and overwrite replaces every row; "
                             "set one of them")
        return self

    @model_validator(mode="after")
    def _engine_options(self):
        """Validated into the backend's own options model, so the actors receive options that are valid (the
        values as that model reads them: `block_size="16"` becomes 16)."""
        try:
            parsed = parse_options(self.backend, self.engine_options)
        except OptionError as e:
            raise ValueError(f"engine_options: {e}") from None
        self.engine_options = parsed.model_dump(mode="json", exclude_unset=True)
        return self

    @model_validator(mode="after")
    def _request(self):
        """Validated by SamplingParams itself (its rules, its messages), then kept as it reads them."""
        try:
            params = self.request_defaults()
        except RowError as e:
            raise ValueError(str(e).replace("invalid request values", "invalid request defaults")) from None
        for k in REQUEST_FIELDS:
            setattr(self, k, getattr(params, k))
        return self

    def request_defaults(self) -> SamplingParams:
        return request_params({k: getattr(self, k) for k in REQUEST_FIELDS})

    def row_spec(self) -> RowSpec:
        if self.input_format == "openai":   # each line holds a prompt or messages
            return RowSpec(messages_column="messages", either=True, defaults=self.request_defaults())
        return RowSpec(prompt_column=self.prompt_column, messages_column=self.messages_column,
                       strip_prompt=self.strip_prompt, defaults=self.request_defaults())

    @property
    def source_column(self) -> str:
        return self.messages_column or self.prompt_column

    @property
    def served_name(self) -> str | None:
        """The model name OpenAI lines must give (None: any)."""
        return None if self.model_name == "*" else self.model_name or self.model

    @property
    def kept(self) -> list[str]:
        if self.input_format == "openai":
            from .openai_input import KEPT
            return KEPT.names
        return list(self.keep_columns) if self.keep_columns is not None else ["id", self.source_column]

    def fingerprint(self, files: list[dict], **resolved: Any) -> str:
        """Hash of everything that decides the output bytes: the input files, the model, the row semantics and the
        shard cut. Actors, GPUs, batch size and the cluster address are left out: a rerun may change them.
        resolved: keys as they resolve for these files (id_column 'auto' -> 'id' or None)."""
        config = {k: resolved.get(k, getattr(self, k)) for k in ROW_KEYS}
        config = {k: v for k, v in self.model_copy(update=config).model_dump(mode="json").items() if k in ROW_KEYS
                  and (k in _FINGERPRINTED or k not in REQUEST_FIELDS or v != REQUEST_DEFAULTS[k])
                  and v not in _LATER.get(k, ())}
        blob = json.dumps({"config": config, "files": files}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


JobConfig = create_model(
    "JobConfig", __base__=_Job, __doc__="A Parquet job: what to read and write, the engine, the request defaults "
    "(the fields of SamplingParams) and how to run.",
    **{name: request_field(f) for name, f in SamplingParams.model_fields.items()})


def load_config(path: str | None, overrides: dict[str, Any]) -> JobConfig:
    """The YAML file (if any) with flags on top; validation errors become one ConfigError naming every key."""
    data: dict[str, Any] = {}
    if path:
        import yaml
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(data, source=path)


def validate_config(data: dict[str, Any], source: str | None = None) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain_config(e, source)) from None


def explain_config(error: ValidationError, source: str | None = None) -> str:
    fields = JobConfig.model_fields
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
        top = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}; allowed keys: {', '.join(sorted(fields))}")
        elif not err["loc"]:     # a check across keys: its message names them; the input is the whole mapping
            lines.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "missing":
            lines.append(f"{key}: required ({fields[top].description})")
        else:
            hint = f" [{fields[top].description}]" if top in fields else ""
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r}){hint}")
    where = f" in {source}" if source else ""
    return f"invalid job configuration{where}: " + "; ".join(lines)
