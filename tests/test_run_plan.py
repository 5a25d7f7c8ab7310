"""run.plan: the run folder, its manifest and the shards to do, decided without Ray or a model."""

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ray_pipeline.cli import Interrupted
from ray_pipeline.config import RunConfig
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import FAILED, fingerprint_hash
from ray_pipeline.run import plan
from ray_pipeline.run_folder import RunFolder
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter, shard_path

pytestmark = pytest.mark.fast


@pytest.fixture
def config(tmp_path) -> RunConfig:
    """Four problems in two shards of two, N = 2, a model folder that is never loaded."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "num_attention_heads": 4}')
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return RunConfig(
        model_path=str(model),
        dataset=str(data),
        num_return_sequences=2,
        shard_size=2,
        backend="hf",
        output_dir=str(tmp_path / "out"),
    ).validate()


def commit(run: RunFolder, shard_id: int) -> None:
    """Write shard `shard_id` as execute would: every row of its problems, with the run's fingerprint."""
    rows = []
    for problem in run.problems.filter(pc.equal(run.problems.column("shard_id"), shard_id)).to_pylist():
        for k in range(run.config.num_return_sequences):
            rows.append({name: None for name in SHARD_SCHEMA.names} | problem | {"candidate_index": k})
    writer = ShardWriter(run.shards_dir, run.manifest.expected_rows(), fingerprint=run.manifest.fingerprint_hash)
    writer.add(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))


def test_a_new_run_plans_every_shard_and_writes_nothing_but_its_folder(config):
    with plan(config, "prog", ["--limit", "4"]) as run:
        assert run.new and run.todo == [0, 1] and run.notes == []
        assert run.path.name.startswith("probs_candidates_model_")
        assert run.resume_command == f"prog --limit 4 --run_id {run.path.name}"
        assert run.manifest.expected_rows() == {0: 4, 1: 4} and run.shard_ids == [0, 1]
        assert run.best.name == f"probs_best_model_{run.path.name.rsplit('_', 1)[1]}.jsonl"
        assert run.manifest.fingerprint_hash == fingerprint_hash(run.manifest.fingerprint)
        folder = Path(run.path.path)
    assert [p.name for p in folder.iterdir()] == [".lock"]


def test_a_resumed_run_plans_only_the_shards_it_lacks_or_distrusts(config):
    with plan(config) as run:
        run.manifest.save(run.path)
        commit(run, 0)
    with plan(config) as run:
        assert not run.new and run.todo == [1] and run.notes == []
        commit(run, 1)
        run.manifest.set_status(1, FAILED)
        run.manifest.save(run.path)
    with plan(config) as run:
        assert run.todo == [] and run.notes == []
    with plan(dataclasses.replace(config, reprocess_failed=True, reprocess_shards="0")) as run:
        assert run.todo == [0, 1]
        assert run.notes == ["shard 0: redo (--reprocess_shards)", "shard 1: redo (--reprocess_failed)"]
        broken = shard_path(run.shards_dir, 1)
    broken.write_bytes(b"PAR1 truncated")
    with plan(config) as run:
        assert run.todo == [1] and run.notes == ["shard 1: unreadable (ArrowInvalid): redo"]


def test_what_the_folder_refuses_is_refused_at_plan(config):
    with plan(config) as run:
        run.manifest.save(run.path)
        run_dir = run.path
    with pytest.raises(PipelineError, match=r"another configuration \(temperature 0.1 -> 0.5\)"):
        with plan(dataclasses.replace(config, temperature=0.5, run_id=run_dir.name)):
            pass
    with pytest.raises(PipelineError, match="exists: drop --no-resume"):
        with plan(dataclasses.replace(config, resume=False)):
            pass
    with pytest.raises(PipelineError, match=r"--reprocess_shards names shards \[7\]"):
        with plan(dataclasses.replace(config, reprocess_shards="7")):
            pass
    # The backend is checked once the cluster resolves 'auto' (execute), not here.
    with plan(dataclasses.replace(config, backend="auto", run_id=run_dir.name)) as run:
        assert not run.new and run.todo == [0, 1]
    (Path(run_dir.path) / "manifest.json").write_text("{broken")
    with pytest.raises(PipelineError, match="is not a readable manifest"):
        with plan(config):
            pass
    with plan(dataclasses.replace(config, overwrite=True)) as run:
        assert run.new and run.todo == [0, 1]


def test_shards_without_a_manifest_are_refused(config):
    with plan(config) as run:
        commit(run, 0)
    with pytest.raises(PipelineError, match="holds shards but no manifest: pass --overwrite"):
        with plan(config):
            pass


def test_the_plan_holds_the_folder_lock_and_ctrl_c_names_the_resume_command(config):
    with pytest.raises(Interrupted, match=r"committed shards are kept in .*; resume with: prog --seed 3 --run_id"):
        with plan(config, "prog", ["--seed", "3"]):
            with pytest.raises(PipelineError, match="is in use by another job"):
                with plan(config):
                    pass
            raise KeyboardInterrupt
