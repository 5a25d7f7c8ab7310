"""The comparison of every selection method on one run: summary.json, report.md, debug records and plots.

`metrics` computes the numbers, `plots` draws them; this module runs the comparison on a run's
shards, renders the markdown report and the per-question debug records, and merges the comparison
into the run's summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

from ray_pipeline.metrics import ALPHA_GRID, MethodResult, compare, pass_at, wilson_interval
from ray_pipeline.plots import PLOTS, shown_sizes, write_plots
from ray_pipeline.reduce import best_record, load_questions
from ray_pipeline.selection import SelectionParams
from ray_pipeline.storage import Location, StoragePath

# Everything a comparison writes into the run folder beside summary.json.
COMPARISON_FILES = ("report.md", "debug.jsonl", *PLOTS.values())


def debug_records(questions: list[list[dict]], results: dict[str, MethodResult], params) -> list[dict]:
    """Per question: what each method chose, its score and the chosen answer's key (least certain) step."""
    records = []
    for i, q in enumerate(questions):
        methods = {}
        for name, result in results.items():
            record = best_record(q, result.choices[i], params)
            methods[name] = {k: record[k] for k in ("candidate_index", "pred", "correct", "score", "key_step")}
        first = q[0]
        records.append(
            {
                "unique_id": first["problem_id"],
                "level": first["level"],
                "subject": first["subject"],
                "gold": first["gold"],
                "preds": [c["pred"] for c in q],
                "correct": [c["correct"] for c in q],
                "methods": methods,
            }
        )
    return records


def compare_run(
    run_dir: Location,
    params: SelectionParams,
    *,
    num_candidates: int | None = None,
    expected_shards: list[int] | None = None,
    allow_partial: bool = False,
) -> dict:
    """Compare every method on a run's shards; write summary.json, report.md, debug.jsonl and the plots."""
    started = time.monotonic()
    run_dir = StoragePath.parse(run_dir)
    questions, missing = load_questions(
        run_dir / "shards",
        expected_shards=expected_shards,
        allow_partial=allow_partial,
        num_candidates=num_candidates,
        answer_extraction=params.answer_extraction,
    )
    results, unavailable, sweep = compare(questions, params)
    n = max(len(q) for q in questions)
    comparison = {
        "problems": len(questions),
        "candidates_per_problem": n,
        # Every selection parameter, in RunConfig's order (a new one appears here and in report.md by itself).
        "params": dataclasses.asdict(params),
        "pass_at_n": pass_at(questions),
        "pass_at_n_by_n": {k: pass_at([q[:k] for q in questions]) for k in range(1, n + 1)},
        "methods": {name: r.summary for name, r in results.items()},
        "accuracy_by_alpha": sweep,
        "unavailable": unavailable,
        # Without a plan (no manifest) nothing proves the shards complete: never claim they are.
        "partial": bool(missing) or expected_shards is None,
        "missing_shards": missing,
        "error_problems": {q[0]["problem_id"]: q[0]["error"] for q in questions if q[0]["error"]},
    }
    records = debug_records(questions, results, params)
    (run_dir / "debug.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_plots(run_dir, questions, results, comparison)
    comparison["reduce_s"] = time.monotonic() - started
    (run_dir / "report.md").write_text(report_markdown(run_dir.name, comparison))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["comparison"] = comparison
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return comparison


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _setting(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def report_markdown(run_id: str, comparison: dict) -> str:
    """The report: one table per view (overall, by level, by subject, by N', by alpha) and the plots."""
    methods = comparison["methods"]
    n = comparison["candidates_per_problem"]
    settings = ", ".join(f"{name} {_setting(value)}" for name, value in comparison["params"].items())
    lines = [
        f"# Best-of-N selection: {run_id}",
        "",
        f"{comparison['problems']} problems × N = {n} candidates; {settings}. "
        "Accuracy in %, with its 95 % Wilson interval; AUROC of the method's per-candidate score for "
        "the candidate's correctness; answerless-last changed: on how many questions ranking candidates "
        "without an extracted answer last changed the pick (— when the rule is off).",
        "",
        "| method | accuracy | 95 % CI | AUROC | answerless-last changed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in methods.items():
        auc = "—" if m["auroc"] is None else f"{m['auroc']:.3f}"
        changed = m.get("answerless_last_changed")
        changed = "—" if changed is None else str(changed)
        ci = f"{_pct(m['ci95'][0])}–{_pct(m['ci95'][1])}"
        lines.append(f"| {name} | {_pct(m['accuracy'])} | {ci} | {auc} | {changed} |")
    successes = round(comparison["pass_at_n"] * comparison["problems"])
    low, high = wilson_interval(successes, comparison["problems"])
    lines.append(f"| pass@{n} (oracle) | {_pct(comparison['pass_at_n'])} | {_pct(low)}–{_pct(high)} | — | — |")
    for name, reason in comparison["unavailable"].items():
        lines.append(f"\n{name}: not available ({reason}).")
    if comparison.get("partial") and comparison["missing_shards"]:
        missing = comparison["missing_shards"]
        lines.append(f"\n**Partial**: shards {missing} are missing; their problems are not counted.")
    elif comparison.get("partial"):
        lines.append("\n**Unverified**: no shard plan (manifest.json), so these results may be partial.")
    if comparison.get("error_problems"):
        lines += ["", "## Problems without candidates", ""]
        lines += [f"- `{pid}`: {error}" for pid, error in comparison["error_problems"].items()]
    for title, key in (("level", "by_level"), ("subject", "by_subject")):
        groups = sorted({g for m in methods.values() for g in m[key]})
        first = next(iter(methods.values()))[key]
        lines += ["", f"## Accuracy by {title}", ""]
        lines.append("| method | " + " | ".join(f"{g} (n={first[g]['n']})" for g in groups) + " |")
        lines.append("|---|" + "---:|" * len(groups))
        for name, m in methods.items():
            lines.append(f"| {name} | " + " | ".join(_pct(m[key][g]["accuracy"]) for g in groups) + " |")
    sizes = shown_sizes(n)
    lines += ["", "## Accuracy vs N' (each question's first N' candidates)", ""]
    lines.append("| method | " + " | ".join(f"N'={k}" for k in sizes) + " |")
    lines.append("|---|" + "---:|" * len(sizes))
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_pct(m["accuracy_by_n"][k]) for k in sizes) + " |")
    lines.append("| pass@N' | " + " | ".join(_pct(comparison["pass_at_n_by_n"][k]) for k in sizes) + " |")
    if comparison["accuracy_by_alpha"]:
        lines += ["", "## Accuracy vs alpha", ""]
        lines.append("| method | " + " | ".join(str(a) for a in ALPHA_GRID) + " |")
        lines.append("|---|" + "---:|" * len(ALPHA_GRID))
        for name, row in comparison["accuracy_by_alpha"].items():
            lines.append(f"| {name} | " + " | ".join(_pct(row[str(a)]) for a in ALPHA_GRID) + " |")
    lines += ["", "## Plots", ""]
    lines += [f"![{key}]({file})" for key, file in PLOTS.items()]
    lines += ["", f"Per-question choices and key steps: debug.jsonl. Reduced in {comparison['reduce_s']:.1f} s.", ""]
    return "\n".join(lines)
