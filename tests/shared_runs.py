"""Job runs that several end-to-end modules read, made once a session on the session's Ray (`ray_cluster`).

A module that reads one names this module in `pytest_plugins` and imports nothing from it: a plugin's fixture is
one fixture for the whole session (a fixture imported into two modules would be two, each running its job), and
pytest rewrites a plugin's asserts only if it imports the plugin first. What a run was made with is on the run
object. A test that rewrites files of a run folder (jobs.reduce writes report.md, summary.json, best_*.jsonl)
works on a copy (`JobRun.copy`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_job


@dataclass(frozen=True)
class JobRun:
    """A finished job: its --output_dir, its run folder, what it printed on stdout, and what it was made with."""

    out: Path
    run_dir: Path
    stdout: str
    # The flags of the equivalent jobs.infer run (the samples and scores), less --output_dir.
    infer_args: tuple[str, ...]
    dataset: str
    problems: int
    n: int
    max_tokens: int
    answer_extraction: str

    def copy(self, parent: Path) -> Path:
        """A copy of the run folder under `parent`, of the same name, for a test that rewrites files in it."""
        copy = parent / self.run_dir.name
        shutil.copytree(self.run_dir, copy)
        return copy


@pytest.fixture(scope="session")
def main_run(ray_cluster, tmp_path_factory) -> JobRun:
    """The real parts' end-to-end run, read only: 1 full job `jobs.main --method all` on the session's Ray, the
    embedded SmolLM2's real weights, transformers. Every flag serves a reader: 4 problems in 2 shards (test_e2e),
    N 4 so that DeepConf's top 10 % is one candidate, --self_eval (test_compare_e2e), the chat prompt and a
    non-default answer extraction (test_demo_e2e)."""
    problems, n, max_tokens, extraction = 4, 4, 48, "boxed-then-last-number"
    dataset = f"embedded:{problems}"
    infer_args = (
        *("--dataset", dataset, "--num_return_sequences", str(n), "--max_tokens", str(max_tokens)),
        *("--temperature", "0.7", "--shard_size", "2", "--backend", "hf", "--self_eval"),
        *("--prompt", "chat", "--answer_extraction", extraction, "--run_id", "run"),
    )
    out = tmp_path_factory.mktemp("main-run") / "results"
    proc = run_job("jobs.main", *infer_args, "--method", "all", "--output_dir", str(out), cluster=ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return JobRun(out, out / "run", proc.stdout, infer_args, dataset, problems, n, max_tokens, extraction)
