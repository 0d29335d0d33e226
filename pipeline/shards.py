"""Cutting input files into shards from Parquet metadata alone: no row is read to plan a job.

A shard is a run of whole row groups holding about `target` rows, or, for a row group larger than the target, an
equal slice of that group. The cut depends only on the files and the target, so a rerun finds the same shards.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shard:
    file: int        # index into the plan's files
    name: str        # the input file's base name (also the output file's)
    index: int       # position among the file's shards
    start: int       # first row, within the file
    stop: int        # one past the last row

    @property
    def key(self) -> str:
        return f"{self.name}#{self.index}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def cut(file: int, name: str, row_groups: list[int], target: int) -> list[Shard]:
    """row_groups: rows per row group, in file order."""
    bounds: list[tuple[int, int]] = []
    start = offset = 0
    for n in row_groups:
        if n >= target:
            if offset > start:
                bounds.append((start, offset))
            pieces = -(-n // target)
            edges = [offset + n * i // pieces for i in range(pieces + 1)]
            bounds.extend(zip(edges[:-1], edges[1:]))
            start = offset = offset + n
            continue
        if offset - start + n > target:
            bounds.append((start, offset))
            start = offset
        offset += n
    if offset > start:
        bounds.append((start, offset))
    return [Shard(file, name, i, a, b) for i, (a, b) in enumerate(bounds)]
