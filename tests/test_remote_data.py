"""--dataset reads a file from any store pyarrow's file systems read (as --output_dir writes to one), and refuses
every other scheme by name: the kind is "a data set given as a URI"."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import dataset_name
from ray_pipeline.problem_set import embedded_records

RECORDS = embedded_records("embedded:3")


def encoded(suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    if suffix == ".json":
        return json.dumps(RECORDS).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(RECORDS), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("scheme", ["ftp", "http", "https", "sftp", "ssh", "webdav", "git+https", "Ftp", "x-y.z"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_scheme_no_file_system_reads_is_refused_by_name(scheme, suffix):
    with pytest.raises(PipelineError) as refused:
        load_problems(f"{scheme}://host/folder/problems{suffix}")
    message = str(refused.value)
    assert (
        f"scheme {scheme.lower()!r}" in message and "download the file" in message and "does not exist" not in message
    )
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_file_uri_reads_as_its_path(tmp_path, suffix):
    path = tmp_path / f"problems{suffix}"
    path.write_bytes(encoded(suffix))
    assert load_problems(f"file://{path}").equals(load_problems(str(path)))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_data_set_on_an_object_store_reads_as_the_local_file(s3, tmp_path, suffix):
    s3.path(f"data/problems{suffix}").write_bytes(encoded(suffix))
    local = tmp_path / f"problems{suffix}"
    local.write_bytes(encoded(suffix))
    uri = s3.uri(f"data/problems{suffix}")
    assert load_problems(uri).equals(load_problems(str(local)))
    assert dataset_name(uri) == "problems"
    with pytest.raises(PipelineError, match=r"data set file s3://bucket/data/absent\.jsonl does not exist"):
        load_problems(s3.uri("data/absent.jsonl"))
