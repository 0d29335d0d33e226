"""One request vocabulary: every SamplingParams field is a Parquet row column, a queue request field and a `run`
flag (and a job config key), with the same default. Adding a field to SamplingParams adds it everywhere; this test
then asks for one example value of it below."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from phi3_model.engine.sampling_params import SamplingParams
from pipeline.cli import app
from pipeline.config import JobConfig
from workers.queue.schema import QueueRequest, row_spec, sampling_params
from workers.rows import RowSpec, sampling

# field -> (a non-default value as a row cell / queue JSON value, the same as `run` flag words, the value the
# request then holds). Hand-written: the expected value is not computed by the code under test.
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
EXAMPLES = {
    "max_new_tokens": (17, ["--max-new-tokens", "17"], 17),
    "temperature": (0.5, ["--temperature", "0.5"], 0.5),
    "top_k": (5, ["--top-k", "5"], 5),
    "top_p": (0.5, ["--top-p", "0.5"], 0.5),
    "seed": (11, ["--seed", "11"], 11),
    "stop_token_ids": ([3, 4], ["--stop-token-ids", "3,4"], (3, 4)),
    "stop": (["##", "@@"], ["--stop", "##", "--stop", "@@"], ("##", "@@")),
    "min_new_tokens": (2, ["--min-new-tokens", "2"], 2),
    "ignore_eos": (True, ["--ignore-eos"], True),
    "n": (3, ["--n", "3", "--temperature", "0.7"], 3),
    "logprobs": (2, ["--logprobs", "2"], 2),
    "prompt_logprobs": (1, ["--prompt-logprobs", "1"], 1),
    "logit_bias": ({"5": 2.5}, ["--logit-bias", '{"5": 2.5}'], {5: 2.5}),
    "bad_words": (["spam"], ["--bad-words", "spam"], ("spam",)),
    "allowed_token_ids": ([1, 2, 3], ["--allowed-token-ids", "1,2,3"], (1, 2, 3)),
    "skip_special_tokens": (True, ["--skip-special-tokens"], True),
    "json_schema": ('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}',
                    ["--json-schema", '{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                      '"required": ["a"]}'], SCHEMA),
    "json_object": (True, ["--json-object"], True),
    "regex": ("[a-z]+", ["--regex", "[a-z]+"], "[a-z]+"),
    "choice": (["yes", "no"], ["--choice", "yes", "--choice", "no"], ("yes", "no")),
    "grammar": ('root ::= "a" | "b"', ["--grammar", 'root ::= "a" | "b"'], 'root ::= "a" | "b"'),
}
FIELDS = list(SamplingParams.model_fields)
NEEDS = {"n": {"temperature": 0.7}}  # a field that is only valid with another one set


def test_every_field_has_an_example():
    assert sorted(EXAMPLES) == sorted(FIELDS), "add an example value for each new SamplingParams field"


@pytest.mark.parametrize("name", FIELDS)
def test_the_job_config_has_the_field_with_the_same_default(name):
    job = JobConfig(input="in", output="out", model="m")
    assert getattr(job, name) == SamplingParams.model_fields[name].default
    assert JobConfig.model_fields[name].description == SamplingParams.model_fields[name].description


@pytest.mark.parametrize("name", FIELDS)
def test_a_parquet_row_column_overrides_the_field(name):
    cell, _, want = EXAMPLES[name]
    table = pa.table({"prompt": ["x"], name: [cell], **{k: [v] for k, v in NEEDS.get(name, {}).items()}})
    row = table.to_pylist()[0]   # as the actors see a row: through Arrow
    assert getattr(sampling(row, RowSpec()), name) == want
    assert getattr(sampling({name: None}, RowSpec()), name) == SamplingParams.model_fields[name].default


@pytest.mark.parametrize("name", FIELDS)
def test_a_queue_request_field_sets_it_and_leaving_it_out_keeps_the_default(name):
    cell, _, want = EXAMPLES[name]
    request = QueueRequest.model_validate({"id": "a", "prompt": "x", name: cell, **NEEDS.get(name, {})})
    assert getattr(sampling_params(request, row_spec()), name) == want
    plain = QueueRequest.model_validate({"id": "b", "prompt": "x"})
    assert getattr(sampling_params(plain, row_spec()), name) == SamplingParams.model_fields[name].default


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hello"]}), path)
    return str(path)


@pytest.mark.parametrize("name", FIELDS)
def test_a_run_flag_sets_the_field(name, tiny_input, tmp_path):
    """The dry run prints the job's request defaults that differ from the vocabulary's."""
    _, words, want = EXAMPLES[name]
    out = CliRunner().invoke(app, ["run", "-i", tiny_input, "-o", str(tmp_path / "out"), "--model", "m",
                                   "--dry-run", *words])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("request "))
    job = JobConfig(input="i", output="o", model="m", **{name: want, **NEEDS.get(name, {})})
    assert getattr(job.request_defaults(), name) == want
    import json
    dumped = job.request_defaults().model_dump(mode="json")[name]
    assert f"{name}={json.dumps(dumped)}" in line


def test_a_bad_value_is_refused_the_same_way_everywhere(tiny_input, tmp_path):
    from pipeline.config import ConfigError, validate_config
    from workers.rows import RowError
    with pytest.raises(RowError, match=r"top_p=0\.0"):
        sampling({"top_p": 0.0}, RowSpec())
    with pytest.raises(ValueError, match=r"top_p=0\.0"):   # refused as the request is read (enqueue, worker)
        QueueRequest.model_validate({"id": "a", "prompt": "x", "top_p": 0.0})
    with pytest.raises(ConfigError, match=r"top_p"):
        validate_config(dict(input="i", output="o", model="m", top_p=0.0))
    out = CliRunner().invoke(app, ["run", "-i", tiny_input, "-o", str(tmp_path / "o"), "--model", "m",
                                   "--top-p", "0"])
    assert out.exit_code == 2 and "top_p" in out.output


def test_the_readme_documents_every_field():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme.split("## Request fields", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| (.*?) \|", table, re.M)[1:])   # [0]: the header
    names = {n.strip("` ") for cell in documented for n in cell.split(",")}
    assert sorted(set(FIELDS) - names) == []
