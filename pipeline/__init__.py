"""The Parquet batch job: `run(config) -> Summary`, the same job as `phi3-batch run`."""
from __future__ import annotations

from .config import ConfigError, JobConfig, load_config
from .summary import Summary

__all__ = ["ConfigError", "JobConfig", "Summary", "load_config", "run"]


def run(config: JobConfig | dict) -> Summary:
    """Run (or resume) a job to completion. Raises ConfigError for a job that cannot start; failed shards are
    reported in the summary (`summary.ok` is False), not raised."""
    from .driver import run as drive
    if isinstance(config, dict):
        from .config import validate_config
        config = validate_config(config)
    return drive(config)
