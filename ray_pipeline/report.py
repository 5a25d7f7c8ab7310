"""The comparison of every selection method on one run: summary.json, report.md, debug records and plots.

`metrics` computes the numbers, `plots` draws them; this module runs the comparison on a run's
shards, renders the markdown report and the per-question debug records, and merges the comparison
into the run's summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time

from ray_pipeline.deepconf import OnlineSettings
from ray_pipeline.deepconf.tables import run_tokens_vs_accuracy
from ray_pipeline.graded_run import GradedRun, grade_run
from ray_pipeline.metrics import (
    ALPHA_GRID,
    CURVE_DRAWS,
    MethodResult,
    compare,
    curves,
    pass_curves,
    wilson_interval,
)
from ray_pipeline.plots import PLOTS, shown_sizes, write_plots
from ray_pipeline.reduce import best_record, error_problems, pass_at_n
from ray_pipeline.run_folder import ShardPlan
from ray_pipeline.selection import SelectionParams
from ray_pipeline.storage import Location, StoragePath

# Everything a comparison writes into the run folder beside summary.json.
COMPARISON_FILES = ("report.md", "debug.jsonl", *PLOTS.values())


def debug_records(run: GradedRun, results: dict[str, MethodResult], params) -> list[dict]:
    """Per question: what each method chose, its score and the chosen answer's key (least certain) step."""
    records = []
    ids, levels, subjects, golds = (run.column(c) for c in ("problem_id", "level", "subject", "gold"))
    for p in range(run.problems):
        methods = {}
        for name, result in results.items():
            record = best_record(run, p, result.picks.choice(run, p), params)
            methods[name] = {k: record[k] for k in ("candidate_index", "pred", "correct", "score", "key_step")}
        records.append(
            {
                "unique_id": ids[p],
                "level": levels[p],
                "subject": subjects[p],
                "gold": golds[p],
                "preds": run.preds[run.offsets[p] : run.offsets[p + 1]],
                "correct": run.correct_of(p),
                "methods": methods,
            }
        )
    return records


def compare_run(
    run_dir: Location,
    params: SelectionParams,
    *,
    num_candidates: int | None = None,
    plan: ShardPlan | None = None,
    allow_partial: bool = False,
    workers: int | None = None,
    graded: GradedRun | None = None,
    online: OnlineSettings | None = None,
) -> dict:
    """Compare every method on a run's shards; write summary.json, report.md, debug.jsonl and the plots.

    `graded`: the run's shards already checked, graded and grouped for these parameters (jobs.main's
    best-answer step did it), so they are not read and graded again. `online`: the run's DeepConf
    settings, which the tokens-vs-accuracy table simulates on a full run's engine confidences. The
    comparison's `stage_s` says where its time went: read, grade and group, methods, curves, report, plots.
    """
    started = time.monotonic()
    stages: dict[str, float] = {}
    run_dir = StoragePath.parse(run_dir)
    run = graded or grade_run(
        run_dir / "shards",
        params,
        plan=plan,
        allow_partial=allow_partial,
        num_candidates=num_candidates,
        workers=workers,
        timings=stages,
        online=online,
    )
    clock = time.perf_counter()
    results, unavailable, sweep = compare(run, params)
    stages["methods"] = time.perf_counter() - clock
    clock = time.perf_counter()
    curve = curves(run, list(results), params)
    pass_by_n, pass_by_first_n = pass_curves(run)
    stages["curves"] = time.perf_counter() - clock
    for name, result in results.items():
        result.summary["accuracy_by_n"] = curve["accuracy_by_n"][name]
        result.summary["accuracy_by_first_n"] = curve["accuracy_by_first_n"][name]
    n = int(run.sizes.max())
    comparison = {
        "problems": run.problems,
        # Problems without a gold answer: accuracy, its interval, pass@N and AUROC count the others.
        "ungraded": run.problems - run.graded,
        "candidates_per_problem": n,
        # Every selection parameter, in RunConfig's order (a new one appears here and in report.md by itself).
        "params": dataclasses.asdict(params),
        "pass_at_n": pass_at_n(run),
        "pass_at_n_by_n": pass_by_n,
        "pass_at_n_by_first_n": pass_by_first_n,
        "curve_draws": CURVE_DRAWS,
        "methods": {name: r.summary for name, r in results.items()},
        "accuracy_by_alpha": sweep,
        "unavailable": unavailable,
        # Without a plan (no manifest) nothing proves the shards complete: never claim they are.
        "partial": bool(run.missing) or plan is None,
        "missing_shards": run.missing,
        "error_problems": error_problems(run),
        "distinct_answers_median": statistics.median(run.distinct) if run.distinct else 0,
        "symbolic_comparisons": run.symbolic,
        # math-verify counts a timed-out parse or comparison as "not equivalent": how many there were.
        "math_verify_timeouts": run.timeouts,
        "tokens_vs_accuracy": run_tokens_vs_accuracy(run, results),
        "online_run": bool(run.values["online"].all()) if len(run.preds) else False,
        "confidences": run.confidence_source,
    }
    clock = time.perf_counter()
    records = debug_records(run, results, params)
    (run_dir / "debug.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stages["report"] = time.perf_counter() - clock
    clock = time.perf_counter()
    write_plots(run_dir, run, results, comparison)
    stages["plots"] = time.perf_counter() - clock
    comparison["stage_s"] = stages
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


def _ungraded_note(comparison: dict) -> list[str]:
    ungraded = comparison.get("ungraded", 0)
    if not ungraded:
        return []
    graded = comparison["problems"] - ungraded
    return [
        "",
        f"**Not graded**: {ungraded} of the {comparison['problems']} problems have no gold answer; accuracy, its "
        f"interval, pass@N and AUROC are over the other {graded}.",
    ]


def _confidence_note(comparison: dict) -> str:
    source = comparison.get("confidences", "scorer")
    if source == "engine":
        return "sampling engine's confidences (its raw top-k log-probs, stored with the run)"
    if source == "scorer":
        return "scorer's confidences (a teacher-forced pass over each candidate)"
    return f"confidences of the {source}"


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
        *_ungraded_note(comparison),
        f"The confidence methods (lowest-group, tail, deepconf-*) read the {_confidence_note(comparison)}.",
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
    graded = comparison["problems"] - comparison.get("ungraded", 0)
    successes = round((comparison["pass_at_n"] or 0) * graded)
    low, high = wilson_interval(successes, graded)
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
    draws = comparison["curve_draws"]
    lines += ["", "## Accuracy vs N'", ""]
    lines.append(
        f"Each method's mean accuracy over {draws} random subsets of N' of each question's candidates (seeded); "
        "pass@N' is the unbiased estimator 1 − C(n − c, N') / C(n, N'). summary.json also keeps each question's "
        "first N' candidates (`accuracy_by_first_n`)."
    )
    lines.append("")
    lines.append("| method | " + " | ".join(f"N'={k}" for k in sizes) + " |")
    lines.append("|---|" + "---:|" * len(sizes))
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_pct(_at(m["accuracy_by_n"], k)) for k in sizes) + " |")
    lines.append("| pass@N' | " + " | ".join(_pct(_at(comparison["pass_at_n_by_n"], k)) for k in sizes) + " |")
    if comparison.get("online_run"):
        lines += [
            "",
            "An online run (`--generation deepconf-online`): `deepconf-online` is its own vote (the launched "
            "traces whose lowest group confidence reaches their problem's threshold); every other method reads "
            "every trace, a stopped one as far as it was generated.",
        ]
    if comparison.get("tokens_vs_accuracy"):
        rows = comparison["tokens_vs_accuracy"]
        lines += ["", "## Tokens vs accuracy", ""]
        lines.append(
            f"Tokens generated and accuracy (%), each row's accuracy minus the first row's ({rows[0]['name']}) on "
            "the same problems with Newcombe's 95 % paired interval."
        )
        lines += ["", "| strategy | tokens | vs first | accuracy | 95 % CI | paired difference | 95 % CI |"]
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            low, high = r["accuracy_ci95"]
            d_low, d_high = r["paired_difference_ci95"]
            lines.append(
                f"| {r['name']} | {r['tokens']:,} | {r['tokens_vs_reference']:.2f} | {_pct(r['accuracy'])} | "
                f"{_pct(low)}–{_pct(high)} | {100 * r['paired_difference']:+.1f} | "
                f"{100 * d_low:+.1f}–{100 * d_high:+.1f} |"
            )
    if comparison["accuracy_by_alpha"]:
        lines += ["", "## Accuracy vs alpha", ""]
        lines.append("| method | " + " | ".join(str(a) for a in ALPHA_GRID) + " |")
        lines.append("|---|" + "---:|" * len(ALPHA_GRID))
        for name, row in comparison["accuracy_by_alpha"].items():
            lines.append(f"| {name} | " + " | ".join(_pct(row[str(a)]) for a in ALPHA_GRID) + " |")
    lines += ["", "## Plots", ""]
    lines += [f"![{key}]({file})" for key, file in PLOTS.items()]
    stages = ", ".join(f"{name.replace('_', ' ')} {s:.1f} s" for name, s in comparison.get("stage_s", {}).items())
    timeouts = comparison.get("math_verify_timeouts", 0)
    lines += [
        "",
        f"Per-question choices and key steps: debug.jsonl. Reduced in {comparison['reduce_s']:.1f} s ({stages}); "
        f"median distinct answers per question {comparison.get('distinct_answers_median')}, "
        f"{comparison.get('symbolic_comparisons', 0)} symbolic comparisons, "
        f"{timeouts} math-verify timeouts (each counted as \"not equivalent\").",
        "",
    ]
    return "\n".join(lines)


def _at(values: dict, k: int):
    """A curve's value at N' = k; summary.json read back has string keys."""
    return values[k] if k in values else values[str(k)]
