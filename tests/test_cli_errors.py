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
