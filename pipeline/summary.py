"""What a job did: totals over every run of it (from the manifest) and this run's speed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Summary:
    output: str
    job: str                      # the job's fingerprint
    rows: int                     # rows in the input
    rows_ok: int                  # rows with a completion
    rows_failed: int              # rows with an error cell, plus rows of failed shards
    shards: int
    shards_ok: int
    shards_skipped: int           # finished by an earlier run
    failed_shards: list[dict]     # {key, error, attempts}
    prompt_tokens: int
    completion_tokens: int
    wall_s: float                 # this run, start to end
    generate_s: float             # this run, from the engines being ready to the last shard done
    run_rows: int                 # rows computed by this run
    run_completion_tokens: int
    actors: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)   # output files written or already complete
    retried: dict | None = None   # --retry-errors: {rows, ok, failed}, the rows recomputed and how they came out

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    @property
    def output_tokens_per_s(self) -> float:
        return self.run_completion_tokens / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.run_rows / self.generate_s if self.generate_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok, output_tokens_per_s=self.output_tokens_per_s,
                    requests_per_s=self.requests_per_s)

    def lines(self) -> list[str]:
        out = [f"rows     {self.rows_ok} ok, {self.rows_failed} failed, of {self.rows}",
               f"shards   {self.shards_ok} ok ({self.shards_skipped} from earlier runs), "
               f"{len(self.failed_shards)} failed, of {self.shards}",
               f"tokens   {self.prompt_tokens} prompt, {self.completion_tokens} completion",
               f"this run {self.run_rows} rows in {self.wall_s:.1f} s ({self.generate_s:.1f} s generating): "
               f"{self.output_tokens_per_s:.1f} output tok/s, {self.requests_per_s:.2f} rows/s",
               f"output   {self.output}"]
        if self.retried is not None:
            r = self.retried
            out.insert(1, f"retry    {r['rows']} row(s) with an error recomputed: {r['ok']} ok now, "
                          f"{r['failed']} failed again; every other row kept")
        for f in self.failed_shards:
            out.append(f"FAILED   shard {f['key']} after {f['attempts']} attempt(s): {f['error']}")
        return out
