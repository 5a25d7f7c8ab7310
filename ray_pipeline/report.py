"""The comparison of every selection method on one run: summary.json, report.md, debug records and plots.

Accuracy is the share of questions whose chosen candidate is correct, with a 95 % Wilson
interval; pass@N the share with any correct candidate (the oracle). AUROC is that of a method's
per-candidate score for the candidate's correctness, pooled over all candidates of all questions.
With `answerless_last` on, each method also says on how many questions that rule changed its pick.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace

from ray_pipeline.reduce import best_record, load_questions
from ray_pipeline.selection import METHODS, Choice, MethodUnavailable, SelectionParams, alpha_methods
from ray_pipeline.storage import Location, StoragePath

ALPHA_GRID = [round(0.1 * i, 1) for i in range(11)]
PLOTS = {
    "accuracy_vs_n": "accuracy_vs_n.png",
    "accuracy_vs_alpha": "accuracy_vs_alpha.png",
    "score_histograms": "score_histograms.png",
}
# Everything a comparison writes into the run folder beside summary.json.
COMPARISON_FILES = ("report.md", "debug.jsonl", *PLOTS.values())


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN scores are dropped.

    NaN when either class is empty.
    """
    pairs = [(s, bool(y)) for s, y in zip(scores, labels) if s is not None and not math.isnan(s) and y is not None]
    positives = sum(y for _, y in pairs)
    negatives = len(pairs) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # Mann-Whitney U from average ranks.
    ordered = sorted(pairs, key=lambda p: p[0])
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2
        rank_sum += average_rank * sum(y for _, y in ordered[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def select_all(questions: list[list[dict]], name: str, params: SelectionParams) -> list[Choice]:
    method = METHODS[name]
    return [method(q, params) for q in questions]


def accuracy(questions: list[list[dict]], choices: list[Choice]) -> float:
    return sum(bool(q[c.index]["correct"]) for q, c in zip(questions, choices)) / len(questions)


def pass_at(questions: list[list[dict]]) -> float:
    return sum(any(c["correct"] for c in q) for q in questions) / len(questions)


def _by(questions, choices, key) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for q, c in zip(questions, choices):
        value = q[0][key]
        groups["unknown" if value is None else str(value)].append(bool(q[c.index]["correct"]))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


@dataclass
class MethodResult:
    choices: list[Choice]
    summary: dict


def evaluate(questions: list[list[dict]], name: str, params: SelectionParams) -> MethodResult:
    """One method on every question: its choices and the summary numbers of the report."""
    choices = select_all(questions, name, params)
    correct = sum(bool(q[c.index]["correct"]) for q, c in zip(questions, choices))
    scores = [s for c in choices for s in c.scores]
    labels = [cand["correct"] for q in questions for cand in q]
    by_n = {}
    for k in range(1, max(len(q) for q in questions) + 1):
        prefix = [q[:k] for q in questions]
        by_n[k] = accuracy(prefix, select_all(prefix, name, params))
    changed = None
    if params.answerless_last:
        plain = select_all(questions, name, replace(params, answerless_last=False))
        changed = sum(a.index != b.index for a, b in zip(choices, plain))
    summary = {
        "accuracy": correct / len(questions),
        "ci95": list(wilson_interval(correct, len(questions))),
        "auroc": _none_if_nan(auroc(scores, labels)),
        "by_level": _by(questions, choices, "level"),
        "by_subject": _by(questions, choices, "subject"),
        "accuracy_by_n": by_n,
        # Questions whose pick the answerless-last rule changed (None: the rule is off).
        "answerless_last_changed": changed,
    }
    return MethodResult(choices, summary)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def compare(questions: list[list[dict]], params: SelectionParams) -> tuple[dict[str, MethodResult], dict, dict]:
    """Every available method on `questions`: results, the methods left out and why, and the alpha sweep."""
    results, unavailable = {}, {}
    for name in METHODS:
        try:
            results[name] = evaluate(questions, name, params)
        except MethodUnavailable as exc:
            unavailable[name] = str(exc)
    sweep = {
        name: {str(a): accuracy(questions, select_all(questions, name, replace(params, alpha=a))) for a in ALPHA_GRID}
        for name in alpha_methods(params)
        if name in results
    }
    return results, unavailable, sweep


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
        "params": {
            "alpha": params.alpha,
            "lambda_weight": params.lambda_weight,
            "borda_power": params.borda_power,
            "borda_score": params.borda_score,
            "deepconf_window": params.deepconf_window,
            "answerless_last": params.answerless_last,
            "answer_extraction": params.answer_extraction,
        },
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


def shown_sizes(n: int) -> list[int]:
    """The N' a table or an axis names: every one up to 16, else the powers of two and N (64 columns do not read)."""
    if n <= 16:
        return list(range(1, n + 1))
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def report_markdown(run_id: str, comparison: dict) -> str:
    """The report: one table per view (overall, by level, by subject, by N', by alpha) and the plots."""
    methods = comparison["methods"]
    n, p = comparison["candidates_per_problem"], comparison["params"]
    answerless = "on" if p["answerless_last"] else "off"
    lines = [
        f"# Best-of-N selection: {run_id}",
        "",
        f"{comparison['problems']} problems × N = {n} candidates; alpha {p['alpha']}, lambda_weight "
        f"{p['lambda_weight']}, borda_power {p['borda_power']}, borda_score {p['borda_score']}, "
        f"deepconf_window {p['deepconf_window']}, answerless_last {answerless}, "
        f"answer_extraction {p.get('answer_extraction', 'boxed')}. "
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


def _save(fig, target: StoragePath) -> None:
    """Render into memory, then write the bytes: a store takes whole objects, not matplotlib's file."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    target.write_bytes(png.getvalue())


def write_plots(run_dir: StoragePath, questions, results: dict[str, MethodResult], comparison: dict) -> None:
    """Accuracy vs N', accuracy vs alpha, and per-method score histograms of correct vs wrong candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = comparison["candidates_per_problem"]
    sizes = list(range(1, n + 1))
    # A colour of its own for each of the (more than ten) methods.
    colors = dict(zip(comparison["methods"], plt.get_cmap("tab20").colors))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in comparison["methods"].items():
        ax.plot(sizes, [m["accuracy_by_n"][k] for k in sizes], marker="o", color=colors[name], label=name)
    ax.plot(sizes, [comparison["pass_at_n_by_n"][k] for k in sizes], "k--", label="pass@N'")
    if n > 16:
        ax.set_xscale("log", base=2)
    ticks = shown_sizes(n)
    ax.set(xlabel="N' (candidates per question)", ylabel="accuracy", title="Accuracy vs N'")
    ax.set_xticks(ticks, labels=[str(k) for k in ticks])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, run_dir / PLOTS["accuracy_vs_n"])

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in comparison["accuracy_by_alpha"].items():
        ax.plot(ALPHA_GRID, [row[str(a)] for a in ALPHA_GRID], marker="o", color=colors[name], label=name)
    ax.set(xlabel="alpha (1 = token level, 0 = step level)", ylabel="accuracy", title="Accuracy vs alpha")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run_dir / PLOTS["accuracy_vs_alpha"])

    scored = {name: r for name, r in results.items() if any(not math.isnan(s) for c in r.choices for s in c.scores)}
    cols = 4
    rows = max(1, math.ceil(len(scored) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    labels = [cand["correct"] for q in questions for cand in q]
    for ax, (name, r) in zip(axes.flat, scored.items()):
        scores = [s for c in r.choices for s in c.scores]
        finite = [s for s in scores if not math.isnan(s)]
        low, high = min(finite), max(finite)
        # Shared bins, so the two histograms line up (a single value gets numpy's default range).
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 20
        # Densities: correct candidates are usually far fewer than wrong ones.
        for want, color in ((True, "tab:green"), (False, "tab:red")):
            values = [s for s, y in zip(scores, labels) if bool(y) == want and not math.isnan(s)]
            if values:
                label = f"{'correct' if want else 'wrong'} ({len(values)})"
                ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.5, color=color, label=label)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(scored) :]:
        ax.axis("off")
    fig.suptitle("Per-candidate score: correct vs wrong candidates")
    fig.tight_layout()
    _save(fig, run_dir / PLOTS["score_histograms"])
