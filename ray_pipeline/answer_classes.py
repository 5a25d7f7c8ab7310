"""Answer classes: which answers of a problem count as one (the vote's classes, the grader's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def group_answers(
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool],
    *,
    decide: Callable[[str, str], bool | None] | None = None,
) -> np.ndarray:
    """A class id per answer (int64; -1 for no answer), ids numbered by first appearance in `answers`.

    Classes are cliques: every two answers of a class are `equivalent`, which must be symmetric (the one
    pairwise rule; for math answers `answers.answers_equivalent`). Identical strings always share a class.
    The partition depends only on the answers and their counts, never on their order: the distinct answers
    are taken in a canonical order, most common first (ties: by string), and each joins the first class all
    of whose members it is equivalent to, else starts one. The most common answer seeds a class, so a rare
    answer that is equivalent to two non-equivalent ones (a "bridge": 50\\% to both 0.5 and 50) joins at
    most one of their classes and never chains them; a class is never seeded by such a one-off.

    `decide` (optional) is a cheap pre-decision of a pair: True or False where it knows `equivalent`'s
    verdict, None where `equivalent` must run. A class's members are all pre-decided before `equivalent`
    runs on any of them, so one decided False rules the class out at no cost. Each unordered pair is
    decided at most once per call (an answer meets each member of a class once), always with the earlier
    answer of the canonical order first.

    The ids of a subset are not those of the whole restricted to it where equivalence is not transitive
    (a ~ b ~ c but not a ~ c): no order-independent clique rule can give both.
    """
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    classes: list[list[str]] = []
    class_of: dict[str, int] = {}
    for answer in sorted(counts, key=lambda a: (-counts[a], a)):
        label = next((c for c, members in enumerate(classes) if _joins(answer, members, equivalent, decide)), None)
        if label is None:
            label = len(classes)
            classes.append([])
        classes[label].append(answer)
        class_of[answer] = label
    # Renumber the classes by the first appearance of any of their members in the given order.
    renumber: dict[int, int] = {}
    for answer in counts:
        renumber.setdefault(class_of[answer], len(renumber))
    ids = np.full(len(answers), -1, dtype=np.int64)
    for i, answer in enumerate(answers):
        if answer is not None:
            ids[i] = renumber[class_of[answer]]
    return ids


def _joins(
    answer: str,
    members: list[str],
    equivalent: Callable[[str, str], bool],
    decide: Callable[[str, str], bool | None] | None,
) -> bool:
    """Whether `answer` is equivalent to every member of a class (each member precedes it in the canonical order)."""
    undecided = members
    if decide is not None:
        undecided = []
        for member in members:
            verdict = decide(member, answer)
            if verdict is False:
                return False
            if verdict is None:
                undecided.append(member)
    return all(equivalent(member, answer) for member in undecided)
