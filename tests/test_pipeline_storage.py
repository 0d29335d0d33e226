"""Input and output on an object store: `s3://` URIs resolved by pyarrow.fs against a real S3 protocol server (moto's,
in-process), which has no append and no atomic rename. Real local Ray, the native engine on the tiny model."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipeline
from tests.pipeline_helpers import PROMPTS, job, lm, reference_generate  # noqa: F401


@pytest.fixture
def s3(monkeypatch):
    """A query string that points pyarrow's S3 filesystem at a fresh moto server holding bucket 'jobs'."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer
    for key, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                           AWS_EC2_METADATA_DISABLED="true").items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="jobs")
    yield f"?endpoint_override=http://{host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_s3_input_and_output_and_a_rerun_that_skips_finished_work(ray_local, tiny_model_dir, lm, s3):
    fs, _ = pafs.FileSystem.from_uri("s3://jobs/in" + s3)
    prompts = PROMPTS[:9]
    with fs.open_output_stream("jobs/in/part-0.parquet") as f:
        pq.write_table(pa.table({"prompt": prompts}), f, row_group_size=4)
    config = job("s3://jobs/in/*.parquet" + s3, "s3://jobs/out" + s3, tiny_model_dir, max_new_tokens=6,
                 shard_rows=4)
    first = pipeline.run(config)
    assert first.ok and first.files == ["part-0.parquet"]
    with fs.open_input_file("jobs/out/part-0.parquet") as f:
        rows = pq.read_table(f).to_pylist()
    assert [r["completion"] for r in rows] == reference_generate(lm, prompts, 6)
    assert [r["id"] for r in rows] == [f"part-0.parquet:{i}" for i in range(len(prompts))]
    listed = sorted(i.path for i in fs.get_file_info(pafs.FileSelector("jobs/out", recursive=True))
                    if i.type == pafs.FileType.File)
    assert listed == ["jobs/out/_manifest.jsonl", "jobs/out/_summary.json", "jobs/out/part-0.parquet"]

    again = pipeline.run(config)
    assert again.ok and again.shards_skipped == 3 and again.run_rows == 0
