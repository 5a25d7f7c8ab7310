"""Bad input against a finished run, through `python -m jobs.infer` / `jobs.reduce`, and a local run beside
a `ray start` cluster: one `error:` line last on stderr, exit 2, the run's shards byte for byte as they were.

The finished run is made on the in-process seam with the tiny model (the refusals stop before Ray and read only
the run folder); the refused jobs are processes, as a user runs them. The local run beside a cluster uses real Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_in_process, run_job
from ray_pipeline.problem_set import embedded_records


def job_args(out: Path, model: str, *extra: str) -> list[str]:
    return [
        "--dataset", "embedded:2", "--num_return_sequences", "2", "--max_tokens", "8", "--model_path", model,
        "--backend", "hf", "--output_dir", str(out), "--run_id", "run", *extra,
    ]  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    """A finished run folder (manifest, shard, config, summary, best answers), made in this process."""
    out = tmp_path_factory.mktemp("finished")
    assert "✅ Done!" in run_in_process("jobs.infer", *job_args(out, tiny_model))
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
def test_bad_input_against_a_finished_run(finished, tiny_model, tmp_path, case):
    (tmp_path / "x.gguf").write_bytes(b"<html>404 not found</html>\n")
    args, message = bad_inputs(tmp_path)[case]
    before = digests(finished / "run")
    line = refused(run_job("jobs.infer", *job_args(finished, tiny_model), *args))
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


def test_local_run_beside_a_ray_start_cluster(ray_cluster):
    """A cluster started with `ray start` on this machine is found by a bare ray.init(), which then refuses
    num_cpus; init_ray starts a Ray of its own, which goes when its job ends.

    The cluster is the session's. Ray finds the last `ray start` address in $RAY_TMPDIR/ray/ray_current_cluster:
    the probes get a temp dir of their own holding the cluster's file, so the local Ray's session is made there,
    not in the running cluster's.
    """
    # Ray's Unix socket paths under the temp dir must stay short, so not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="bestofn-probe-"))
    try:
        port = ray_cluster.gcs_address.rsplit(":", 1)[1]
        written = ray_cluster.temp_dir / "ray_current_cluster"
        assert written.read_text().strip().endswith(f":{port}")
        (root / "ray").mkdir()
        shutil.copyfile(written, root / "ray" / "ray_current_cluster")
        env = ray_cluster.env | {"RAY_TMPDIR": str(root)}
        probe = (
            "import sys, ray\n"
            "from ray_pipeline.config import RunConfig\n"
            "from ray_pipeline.cluster import init_ray\n"
            "if sys.argv[1] == 'bare':\n"
            "    ray.init(num_cpus=2)\n"
            "else:\n"
            "    init_ray(RunConfig())\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "print('SESSION', ray._private.worker.global_worker.node.get_session_dir_path())\n"
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
        assert gcs and not gcs[0].endswith(f":{port}"), ours.stdout
        # A session of its own, under the probes' temp dir: a joined cluster's would be under the cluster's.
        sessions = [line.split(" ", 1)[1] for line in ours.stdout.splitlines() if line.startswith("SESSION ")]
        assert sessions and Path(sessions[0]).is_relative_to(root / "ray"), ours.stdout
        # Ray's processes name their session dir on their command line: none of the local Ray's outlives its job.
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if sessions[0] in " ".join(p.info["cmdline"] or [])]
        _, alive = psutil.wait_procs(leftovers, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:200] for p in alive if p.is_running()]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gguf_without(source: Path, target: Path, dropped: str, blocks: int) -> None:
    """A copy of a GGUF file cut to its first `blocks` transformer blocks (its block count says so), every other
    metadata field and tensor kept, less the tensor `dropped`."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = blocks if field.name == block_count else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    cut = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < blocks]
    kept = [t for t in cut if t.name != dropped]
    assert len(kept) == len(cut) - 1 and len(cut) < len(reader.tensors)
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def test_gguf_missing_a_weight_is_refused(tmp_path, monkeypatch):
    """A GGUF that lacks one tensor would leave that weight random: materializing it fails, naming it.

    The file is the embedded GGUF cut to its first two blocks: dequantizing all thirty is most of the test's time,
    and a missing tensor is found the same way in any number of them.
    """
    from ray_pipeline.errors import PipelineError
    from ray_pipeline.model import embedded_gguf, resolve_model

    monkeypatch.setenv("RAY_PIPELINE_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "SmolLM2-partial.gguf"
    gguf_without(embedded_gguf(), partial, "blk.0.attn_q.weight", blocks=2)
    with pytest.raises(PipelineError) as err:
        resolve_model(str(partial))
    text = str(err.value)
    assert "\n" not in text and f"model file {partial} does not hold every weight" in text
    assert "missing model.layers.0.self_attn.q_proj.weight" in text
    assert not list((tmp_path / "cache").glob("models/*/config.json"))


# A job whose Ray discovery finds no Ray on this machine: Ray's lookup also finds any gcs_server process running here
# (the session's cluster, in this suite), so "none" is its process search stood in for by one that finds nothing.
NO_RAY_FOUND = (
    "import sys\n"
    "import ray._private.services as services\n"
    "services.find_gcs_addresses = lambda: []\n"
    "from jobs.infer import main\n"
    "from ray_pipeline.cli import exit_process\n"
    "exit_process(main(sys.argv[1:]))\n"
)


def auto_args(tiny_model: str, out: Path) -> list[str]:
    args = ["--dataset", "embedded:1", "--num_return_sequences", "1", "--temperature", "0", "--max_tokens", "4"]
    return args + ["--model_path", tiny_model, "--output_dir", str(out)]


@pytest.mark.parametrize("given", ["env", "flag"])
def test_auto_with_no_ray_running_names_what_to_do(tiny_model, tmp_path, given):
    """`auto` joins the Ray this machine runs; with none, one line says so in the job's words (Ray's name a
    `--address` flag the job does not have), at once."""
    root = Path(tempfile.mkdtemp(prefix="bestofn-auto-"))  # no ray_current_cluster: no `ray start` to find
    try:
        env = {**os.environ, "RAY_TMPDIR": str(root)} | ({"RAY_ADDRESS": "auto"} if given == "env" else {})
        flag = ["--ray_address", "auto"] if given == "flag" else []
        proc = subprocess.run(
            [sys.executable, "-c", NO_RAY_FOUND, *auto_args(tiny_model, tmp_path), *flag],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        line = refused(proc)
        source = "$RAY_ADDRESS" if given == "env" else "--ray_address"
        assert line.startswith(f"error: {source} is 'auto', but no Ray runs on this machine: start one"), line
        assert "--address" not in line.replace("--ray_address", ""), line
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_auto_finds_the_running_ray_and_checks_its_token(ray_cluster, tiny_model, tmp_path):
    """`auto` finds a running Ray (Ray's own search: a GCS process on this machine, here the session's cluster and
    whatever local Ray a job beside this test runs); without that cluster's token the job is refused at once naming
    the token (ray.init retried a refused token for 20 s)."""
    from ray._private.services import find_gcs_addresses

    root = Path(tempfile.mkdtemp(prefix="bestofn-auto-"))
    try:
        env = {"RAY_TMPDIR": str(root), "RAY_ADDRESS": "auto", "RAY_AUTH_MODE": "token"}
        env["RAY_AUTH_TOKEN_PATH"] = str(root / "no-token")
        running = set(find_gcs_addresses())
        line = refused(run_job("jobs.infer", *auto_args(tiny_model, tmp_path), env=env))
        running |= set(find_gcs_addresses())
        assert ray_cluster.gcs_address.rsplit(":", 1)[1] in {address.rsplit(":", 1)[1] for address in running}
        found = [address for address in running if f"at {address} " in line]
        assert found and "token" in line, (line, running)
    finally:
        shutil.rmtree(root, ignore_errors=True)
