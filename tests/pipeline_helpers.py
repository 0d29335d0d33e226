"""Shared pieces of the Parquet-job tests: prompt files, the Phi3CausalLM reference, reading outputs."""
from __future__ import annotations

import os
from collections import defaultdict

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.tiny import CORPUS

SENTENCES = list(dict.fromkeys(CORPUS))
# 21 distinct prompts of 2..60 characters
PROMPTS = [SENTENCES[i % len(SENTENCES)][: 2 + (7 * i) % 59] + ("" if i < 9 else f" {i}") for i in range(21)]
FILES = {"a.parquet": (PROMPTS[:13], 5), "b.parquet": (PROMPTS[13:], None)}   # name: (prompts, row group size)


def write_prompts(directory: str, files=FILES, **columns) -> str:
    """One Parquet file per entry; extra `columns` are lists over all prompts in file order."""
    os.makedirs(directory, exist_ok=True)
    start = 0
    for name, (prompts, group) in files.items():
        data = {"prompt": prompts}
        for key, values in columns.items():
            data[key] = values[start:start + len(prompts)]
        pq.write_table(pa.table(data), os.path.join(directory, name), row_group_size=group)
        start += len(prompts)
    return directory


def reference_generate(lm, prompts: list[str], max_new_tokens: int, strip_prompt: bool = True) -> list[str]:
    """`Phi3CausalLM.generate` (greedy), KerasHub semantics: max_length is the TOTAL length (<s> + prompt + new)
    and one value holds for a whole call, so prompts are grouped by token length and each group is one batch with
    max_length = its length + max_new_tokens. The batches together are the dataset; outputs in input order."""
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(lm.tokenizer.encode(p, add_bos=True))].append(i)
    out: list[str | None] = [None] * len(prompts)
    for n, rows in groups.items():
        texts = lm.generate([prompts[i] for i in rows], max_length=n + max_new_tokens, strip_prompt=strip_prompt)
        for i, text in zip(rows, texts):
            out[i] = text
    return out


def read_outputs(directory: str, names=tuple(FILES)) -> list[dict]:
    rows = []
    for name in names:
        rows += pq.read_table(os.path.join(directory, name)).to_pylist()
    return rows


def job(input: str, output: str, model: str, **kw) -> dict:
    return dict(input=input, output=output, model=model, dtype="float32", device="cpu", progress="off", **kw)


def manifest_events(directory: str) -> list[dict]:
    with open(os.path.join(directory, "_manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The single-process API on the tiny model, greedy sampler (import this fixture into a test module)."""
    from phi3_model.causal_lm import Phi3CausalLM
    model = Phi3CausalLM.from_preset(tiny_model_dir, dtype="float32", device="cpu")
    model.compile(sampler="greedy")
    return model
