"""Generate N candidates per MATH-500 problem, score them, and write the best answers.

python -m jobs.infer --dataset ../shared/data/math500.jsonl --limit 20
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.model import check_hub_model, model_name, resolve_model
from ray_pipeline.reduce import reduce_run, summary_json
from ray_pipeline.selection import SelectionParams, get_method


def run(config: RunConfig) -> dict:
    """The whole job: plan, generate and score into shards, then reduce."""
    get_method(config.method)
    problems = load_problems(
        config.dataset, split=config.dataset_split, limit=config.limit, shard_size=config.shard_size
    )
    # Resolving here fails fast on a bad path and materializes a GGUF once before actors start.
    resolved = resolve_model(config.model_path)
    if resolved == config.model_path and not Path(resolved).exists():
        check_hub_model(resolved)
    name = model_name(config.model_path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    output_dir = Path(config.output_dir)
    run_dir = output_dir / (config.run_id or f"math500_candidates_{name}_{stamp}")
    best = output_dir / f"math500_best_{name}_{stamp}.jsonl"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"cannot create the run folder {run_dir}: {exc.strerror}; pass a writable --output_dir"
        ) from None
    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor
    from ray_pipeline.pipeline import init_ray, resolve_execution, run_stages

    init_ray(config)
    config = resolve_execution(config, problems.num_rows)
    config.save(run_dir / "config.json")
    shards_dir = run_dir / "shards"
    num_shards = len(set(problems.column("shard_id").to_pylist()))
    n = config.num_return_sequences

    print(
        f"[1/2] Generating candidates -> {run_dir}/ "
        f"({problems.num_rows} problems x {n} candidates in {num_shards} shards, backend {config.backend})",
        flush=True,
    )
    started = time.monotonic()

    def committed(shard_id: int, path: Path) -> None:
        print(f"  shard {shard_id} committed -> {path} ({time.monotonic() - started:.0f} s)", flush=True)

    run_stages(config, problems, shards_dir, GeneratorActor, ScorerActor, on_commit=committed)
    generate_s = time.monotonic() - started

    print(f"[2/2] Evaluating and selecting best answers -> {best}", flush=True)
    summary = reduce_run(
        shards_dir,
        best,
        method=config.method,
        params=SelectionParams.from_config(config),
        expected_shards=list(range(num_shards)),
    )
    backends = sorted(set(_read_backends(shards_dir)))
    report = json.loads(summary_json(summary)) | {
        "backend": ",".join(backends),
        "generate_and_score_s": generate_s,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"  backend {report['backend']}: {summary.problems} problems, {summary.candidates} candidates, "
        f"accuracy ({config.method}) {summary.accuracy:.3f}, pass@{n} {summary.pass_at_n:.3f}, "
        f"generate+score {generate_s:.0f} s",
        flush=True,
    )
    print(f"✅ Done! Final results saved to: {best}", flush=True)
    return report


def _read_backends(shards_dir: Path) -> list[str]:
    import pyarrow.dataset as pads

    return pads.dataset(shards_dir, format="parquet").to_table(columns=["backend"]).column("backend").to_pylist()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args(argv)
    try:
        run(config_from_args(args))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
