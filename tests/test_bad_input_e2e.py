"""Bad input against a finished run, through `python -m jobs.infer` / `jobs.reduce`, and a local run beside
a `ray start` cluster: one `error:` line last on stderr, exit 2, the run's shards byte for byte as they were.

Real Ray and the embedded SmolLM2 (transformers backend); run under the heavy-test lock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, run_job
from ray_pipeline.problem_set import embedded_records


def job_args(out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "embedded:2", "--num_return_sequences", "2", "--max_tokens", "8",
        "--backend", "hf", "--output_dir", str(out), "--run_id", "run", *extra,
    ]  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    proc = run_job("jobs.infer", *job_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "run" / "shards").glob("*.parquet"))
    return out


def refused(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, and the last stderr line is the one and only `error:` line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    rows = embedded_records("embedded:2")

    def data(name: str, content: bytes) -> list[str]:
        path = tmp / name
        path.write_bytes(content)
        return ["--dataset", str(path)]

    def jsonl(mutate) -> bytes:
        changed = [dict(r) for r in rows]
        mutate(changed)
        return "".join(json.dumps(r) + "\n" for r in changed).encode()

    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (tmp / "data_dir.jsonl").mkdir()
    return {
        "nan level": (data("nan.jsonl", jsonl(lambda r: r[1].update(level=float("nan")))), "row 2: 'level' is nan"),
        "list problem": (data("list.jsonl", jsonl(lambda r: r[0].update(problem=[1]))), "row 1: 'problem' is list"),
        "bool id": (data("id.jsonl", jsonl(lambda r: r[1].update(unique_id=True))), "row 2: 'unique_id' is bool"),
        "huge level": (data("lvl.jsonl", jsonl(lambda r: r[0].update(level=2**40))), "row 1: 'level' is int"),
        "truncated": (data("cut.jsonl", jsonl(lambda r: None)[:-40]), "line 2 is not valid JSON"),
        "directory": (["--dataset", str(tmp / "data_dir.jsonl")], "is a directory"),
        "not gguf": (["--model_path", str(tmp / "x.gguf")], "is not a GGUF file"),
        "config not json": (["--model_path", str(folder)], f"model config {folder / 'config.json'} is not valid JSON"),
    }


CASES = ["nan level", "list problem", "bool id", "huge level", "truncated", "directory", "not gguf", "config not json"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_against_a_finished_run(finished, tmp_path, case):
    (tmp_path / "x.gguf").write_bytes(b"<html>404 not found</html>\n")
    args, message = bad_inputs(tmp_path)[case]
    before = digests(finished / "run")
    line = refused(run_job("jobs.infer", *job_args(finished), *args))
    assert message in line
    assert digests(finished / "run") == before


def test_reduce_on_a_damaged_config(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    config = run_dir / "config.json"
    config.write_bytes(config.read_bytes()[:57])
    before = digests(run_dir / "shards")
    line = refused(run_job("jobs.reduce", str(run_dir), "--method", "self_certainty"))
    assert line.startswith(f"error: run configuration {config} is not a valid config.json")
    assert digests(run_dir / "shards") == before


def test_local_run_beside_a_ray_start_cluster():
    """A cluster started with `ray start` on this machine is found by a bare ray.init(), which then refuses
    num_cpus; init_ray starts a Ray of its own. The cluster is stopped by its own processes (never `ray stop`).
    """
    from test_cluster_mode import LocalCluster

    # Unix socket paths under the temp dir must stay short, so not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="bestofn-h4-"))
    cluster = LocalCluster(root)
    try:
        cluster.start_head("head_node")
        # Ray looks for the last `ray start` address in $RAY_TMPDIR/ray/ray_current_cluster.
        env = cluster.env | {"RAY_TMPDIR": str(root)}
        port = cluster.gcs_address.rsplit(":", 1)[1]
        assert (root / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")
        probe = (
            "import sys, ray\n"
            "from ray_pipeline.config import RunConfig\n"
            "from ray_pipeline.pipeline import init_ray\n"
            "if sys.argv[1] == 'bare':\n"
            "    ray.init(num_cpus=2)\n"
            "else:\n"
            "    init_ray(RunConfig())\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "print('HEAD', ray.cluster_resources().get('head_node', 0))\n"
            "ray.shutdown()\n"
        )
        bare = subprocess.run(
            [sys.executable, "-c", probe, "bare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        # The control: without address="local" the run joins the cluster and crashes.
        assert bare.returncode != 0 and "num_cpus" in bare.stderr, bare.stdout + bare.stderr[-2000:]
        ours = subprocess.run(
            [sys.executable, "-c", probe, "ours"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert ours.returncode == 0, ours.stderr[-3000:]
        gcs = [line for line in ours.stdout.splitlines() if line.startswith("GCS ")]
        assert gcs and not gcs[0].endswith(f":{port}") and "HEAD 0" in ours.stdout, ours.stdout
    finally:
        leftovers = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers


def gguf_without(source: Path, target: Path, dropped: str) -> None:
    """A copy of a GGUF file with every metadata field and every tensor but `dropped`."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    kept = [t for t in reader.tensors if t.name != dropped]
    assert len(kept) == len(reader.tensors) - 1
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def test_gguf_missing_a_weight_is_refused(tmp_path, monkeypatch):
    """A GGUF that lacks one tensor would leave that weight random: materializing it fails, naming it."""
    from ray_pipeline.errors import PipelineError
    from ray_pipeline.model import embedded_gguf, resolve_model

    monkeypatch.setenv("RAY_PIPELINE_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "SmolLM2-partial.gguf"
    gguf_without(embedded_gguf(), partial, "blk.0.attn_q.weight")
    with pytest.raises(PipelineError) as err:
        resolve_model(str(partial))
    text = str(err.value)
    assert "\n" not in text and f"model file {partial} does not hold every weight" in text
    assert "missing model.layers.0.self_attn.q_proj.weight" in text
    assert not list((tmp_path / "cache").glob("models/*/config.json"))
