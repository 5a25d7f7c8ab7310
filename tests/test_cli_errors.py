"""Bad input: one line on stderr, a non-zero exit, before any work starts."""

import pytest

from conftest import run_job


def one_line_error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model_path", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
        (["--model_path", "./no_such_model.gguf"], "does not exist"),
        (["--num_return_sequences", "0"], "num_return_sequences must be in [1, 1024], got 0"),
        (["--alpha", "2"], "alpha must be in [0.0, 1.0], got 2.0"),
        (["--method", "magic"], "method must be one of"),
        (
            ["--tensor_parallel_size", "2"],
            "tensor_parallel_size must divide the model's 9 attention heads (one of 1, 3, 9), got 2",
        ),
    ],
)
def test_bad_flags_and_model_paths(tmp_path, args, message):
    proc = run_job("jobs.infer", "--dataset", "embedded:2", "--output_dir", str(tmp_path), *args)
    assert message in one_line_error(proc)
    assert not any(tmp_path.iterdir())


def test_missing_and_unreadable_data_sets(tmp_path):
    missing = run_job("jobs.infer", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path))
    assert "does not exist" in one_line_error(missing)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"problem": "caf\xe9"}\n')
    unreadable = run_job("jobs.infer", "--dataset", str(bad), "--output_dir", str(tmp_path))
    assert "is not UTF-8 text" in one_line_error(unreadable)


def test_model_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    proc = run_job(
        "jobs.infer",
        "--dataset",
        "embedded:2",
        "--model_path",
        str(folder),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert "has no tokenizer" in one_line_error(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--gpus_per_generator", "0.6"],
            "error: no node can hold a generator actor, which needs {CPU: 1, GPU: 0.6}: no node has a GPU (the alive "
            "nodes have {CPU: 4, GPU: 0}) and no autoscaler can add a node; pass --gpus_per_generator 0 to run "
            "generators on CPUs",
        ),
        (
            ["--scorer_resource", "nonexist_node"],
            "error: no node can hold a scorer actor, which needs {CPU: 1, nonexist_node: 1}: no node has nonexist_node "
            "(the alive nodes have {CPU: 4, nonexist_node: 0}) and no autoscaler can add a node; declare nonexist_node "
            "on a node (ray start --resources '{\"nonexist_node\": 1}') or change --scorer_resource",
        ),
    ],
    ids=["gpu_share_without_gpu", "unknown_custom_resource"],
)
def test_what_no_node_of_the_cluster_has_is_refused_before_any_actor_starts(ray_cluster, tmp_path, args, message):
    """Issue 27, item 4, on the session's Ray (one node, 4 CPUs, no GPU, no custom resource, nothing to add nodes):
    the job joins it, resolves its settings and refuses in one line, instead of waiting for ever with Ray Data's
    "may hang forever" warning (the GPU share) or silently (the custom resource). tests/test_placement.py generates
    every resource kind of both pools over node lists."""
    out = tmp_path / "out"
    proc = run_job("jobs.infer", "--dataset", "embedded:2", "--backend", "hf", "--output_dir", str(out), *args,
                   cluster=ray_cluster)  # fmt: skip
    assert one_line_error(proc) == message
    # Refused before the manifest is written: nothing of a run folder but the folder.
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.parquet"))
