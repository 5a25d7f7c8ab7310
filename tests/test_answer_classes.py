"""Answer classes are cliques of one symmetric rule, and do not depend on the candidates' order.

math-verify's equivalence is not transitive: 50\\% equals 0.5 and 50, but 0.5 does not equal 50; `2,3` (a
list, order free) and `(2,3)` are equivalent, but `(2,3)` and `(3,2)` are not; `2` equals both `x=2` and `y=2`.
The cases below are generated from families of such answers: random multisets of a family (and of two
families mixed), every class checked pair by pair with the rule itself (`answers_equivalent`), the
partition compared over random permutations of the candidates, and "bridge" answers inserted to try to
chain two non-equivalent answers into one class. `answer_classes.group_answers` gets the same checks on
generated non-transitive relations.
"""

import itertools
import random
from functools import cache

import numpy as np
import pytest

from ray_pipeline import grading
from ray_pipeline.answer_classes import group_answers
from ray_pipeline.answers import answers_equivalent, grade
from ray_pipeline.grading import grade_and_group

pytestmark = pytest.mark.fast

FAMILIES = {
    "tuples": ["2,3", "(2,3)", "(3,2)", "3,2", "\\{2,3\\}", "(2, 3)"],
    "percentages": ["50\\%", "0.5", "50", "\\frac{1}{2}", "50.0", "x=50"],
    "fractions": ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}", "2/4", "\\frac{2}{3}", "x=\\frac{1}{2}", "y=0.5"],
    "intervals": ["[1,2]", "x\\in[1,2]", "1\\le x\\le 2", "(1,2)", "x\\in(1,2)", "1,2", "2,1", "(2,1)", "[1,2)"],
    "assignments": ["x=2", "2", "y=2", "x = 2", "2.0", "\\{2\\}"],
    "units": ["5\\text{ cm}", "5", "500\\text{ mm}", "\\$5", "5\\%", "0.05\\text{ m}", "x=5\\text{ cm}", "y=5 m"],
}


@cache
def _eq(a: str, b: str) -> bool:
    return answers_equivalent(a, b)


def eq(a: str, b: str) -> bool:
    """The shared rule, each unordered pair computed once for the whole module."""
    return a == b or _eq(*sorted((a, b)))


def partition(preds, labels) -> set[frozenset]:
    classes: dict[int, set] = {}
    for pred, label in zip(preds, labels):
        if pred is None:
            assert label == -1
        else:
            classes.setdefault(int(label), set()).add(pred)
    return {frozenset(members) for members in classes.values()}


def assert_well_numbered(preds, labels):
    """Identical strings share a label; labels are numbered 0, 1, ... by first appearance; -1 exactly for None."""
    seen: dict[int, int] = {}
    for pred, label in zip(preds, labels):
        if pred is None:
            assert label == -1
            continue
        seen.setdefault(int(label), len(seen))
        assert seen[int(label)] == label, (preds, labels)
    assert all(labels[i] == labels[j] for i, j in itertools.combinations(range(len(preds)), 2) if preds[i] == preds[j])


def assert_cliques(classes: set[frozenset], equivalent):
    for members in classes:
        for a, b in itertools.combinations(sorted(members), 2):
            assert equivalent(a, b), (a, b, sorted(members))


def generated_cases(rng: random.Random, count: int):
    """Candidate lists: a family (or two mixed), a few of its answers, each repeated 1-3 times, some None."""
    names = sorted(FAMILIES)
    for _ in range(count):
        pool = list(FAMILIES[rng.choice(names)])
        if rng.random() < 0.3:
            pool += rng.sample(FAMILIES[rng.choice(names)], 2)
        picked = rng.sample(pool, rng.randint(2, min(5, len(pool))))
        preds = [p for p in picked for _ in range(rng.randint(1, 3))] + [None] * rng.randint(0, 2)
        rng.shuffle(preds)
        yield preds


def test_math_answer_classes_are_cliques_and_order_free():
    rng = random.Random(27)
    for preds in generated_cases(rng, 14):
        gold = rng.choice([p for p in preds if p is not None])
        want = None
        for _ in range(5):
            order = rng.sample(preds, len(preds))
            graded = grade_and_group(order, gold)
            assert_well_numbered(order, graded.labels.tolist())
            got = partition(order, graded.labels)
            assert want is None or got == want, (order, got, want)
            want = got
            # Grades are `grade`'s, whatever the order.
            assert graded.correct == [p is not None and grade(p, gold) for p in order]
        assert_cliques(want, eq)


def test_the_rule_is_grade_both_ways():
    """The one direction rule: two answers are equivalent exactly when each grades correct against the other. So a
    pair math-verify accepts one way only (`(3,2)` as an answer for the gold `2,3`, `[1,2]` for `1 \\le x \\le 2`)
    never shares a class, and every member of a class grades correct with any other member as the gold."""
    one_way = 0
    for family in FAMILIES.values():
        for a, b in itertools.combinations(family, 2):
            forward, backward = grade(a, b), grade(b, a)
            assert eq(a, b) == (forward and backward), (a, b)
            one_way += forward != backward
    assert one_way >= 4


def bridges(family: list[str]) -> list[tuple[str, str, str]]:
    """(a, b, c) with a and b not equivalent and c equivalent to both."""
    return [
        (a, b, c)
        for a, b in itertools.combinations(family, 2)
        if not eq(a, b)
        for c in family
        if c not in (a, b) and eq(a, c) and eq(b, c)
    ]


def test_every_family_splits_where_equivalence_does_not_chain():
    # Each family has an answer equivalent to two that are not equivalent to each other (a bridge).
    for name, family in FAMILIES.items():
        assert bridges(family), name


def test_a_bridge_never_merges_two_answers_that_are_not_equivalent():
    """Mutation: into candidates holding two non-equivalent answers, insert a bridge (equivalent to both) at
    random places, any number of times: the two never share a class, in any order."""
    rng = random.Random(8)
    for family in FAMILIES.values():
        triples = bridges(family)
        for a, b, bridge in rng.sample(triples, min(2, len(triples))):
            base = [a] * rng.randint(1, 3) + [b] * rng.randint(1, 3)
            for copies in (1, 2, 4):
                preds = list(base)
                for _ in range(copies):
                    preds.insert(rng.randint(0, len(preds)), bridge)
                labels = grade_and_group(preds, None).labels.tolist()
                label = dict(zip(preds, labels))
                assert label[a] != label[b], (preds, labels)
                assert_cliques(partition(preds, labels), eq)


def test_the_math_classes_are_group_answers_under_answers_equivalent():
    """One rule, one grouping: the keyed, counted grouping gives the partition the plain pairwise rule gives."""
    rng = random.Random(3)
    for preds in generated_cases(rng, 8):
        graded = grade_and_group(preds, None).labels
        plain = group_answers(preds, eq)
        assert graded.tolist() == plain.tolist(), preds
        assert plain.dtype == np.int64


def test_symbolic_counts_the_math_verify_comparisons_that_ran(monkeypatch):
    ran = []
    real = grading._verify_parsed

    def counted(gold, pred):
        ran.append((gold.text, pred.text))
        return real(gold, pred)

    monkeypatch.setattr(grading, "_verify_parsed", counted)
    for preds, gold in ((FAMILIES["tuples"], "(3,2)"), (FAMILIES["intervals"], "[1,2]"), (["7", "7.0", "8"], "7")):
        ran.clear()
        graded = grade_and_group(list(preds), gold)
        assert graded.symbolic == len(ran), (preds, ran)
        # Each ordered pair at most once: an unordered pair is decided at most once per call.
        assert len(set(ran)) == len(ran), ran


# --- answer_classes.group_answers on generated relations ------------------------------------------------------------


def tolerance(a: str, b: str) -> bool:
    """Integers within 1 of each other: symmetric, not transitive (1 ~ 2 ~ 3, 1 !~ 3)."""
    return abs(int(a) - int(b)) <= 1


def random_relation(rng: random.Random, names: list[str]):
    edges = {frozenset(pair) for pair in itertools.combinations(names, 2) if rng.random() < 0.5}
    return lambda a, b: a == b or frozenset((a, b)) in edges


def test_group_answers_gives_cliques_independent_of_order():
    rng = random.Random(11)
    for trial in range(60):
        names = [str(v) for v in rng.sample(range(12), rng.randint(2, 8))]
        equivalent = tolerance if trial % 2 else random_relation(rng, names)
        answers_ = [n for n in names for _ in range(rng.randint(1, 3))] + [None] * rng.randint(0, 2)
        want = None
        for _ in range(8):
            order = rng.sample(answers_, len(answers_))
            calls = []

            def counted(a, b, equivalent=equivalent, calls=calls):
                calls.append(frozenset((a, b)))
                return equivalent(a, b)

            ids = group_answers(order, counted)
            assert ids.dtype == np.int64 and ids.shape == (len(order),)
            assert_well_numbered(order, ids.tolist())
            assert len(set(calls)) == len(calls), "a pair was decided twice"
            got = partition(order, ids)
            assert want is None or got == want, (order, got, want)
            want = got
        assert_cliques(want, equivalent)


def test_group_answers_pre_decisions_change_nothing_and_save_calls():
    rng = random.Random(5)
    for _ in range(40):
        names = [str(v) for v in rng.sample(range(10), rng.randint(2, 8))]
        equivalent = random_relation(rng, names)
        known = {frozenset(p) for p in itertools.combinations(names, 2) if rng.random() < 0.6}
        order = [n for n in names for _ in range(rng.randint(1, 2))]
        rng.shuffle(order)
        calls = []

        def decide(a, b, equivalent=equivalent, known=known):
            return equivalent(a, b) if frozenset((a, b)) in known else None

        def counted(a, b, equivalent=equivalent, calls=calls):
            calls.append(frozenset((a, b)))
            return equivalent(a, b)

        with_keys = group_answers(order, counted, decide=decide)
        assert with_keys.tolist() == group_answers(order, equivalent).tolist()
        assert not known.intersection(calls), "a pre-decided pair was compared again"


def test_a_bridge_never_chains_two_classes_in_group_answers():
    rng = random.Random(2)
    for low in range(0, 8):
        a, bridge, b = str(low), str(low + 1), str(low + 2)
        for copies in range(1, 4):
            order = [a] * rng.randint(1, 3) + [b] * rng.randint(1, 3)
            for _ in range(copies):
                order.insert(rng.randint(0, len(order)), bridge)
            label = dict(zip(order, group_answers(order, tolerance).tolist()))
            assert label[a] != label[b], order
            # The most common answer seeds its class: a bridge outnumbering both ends keeps one of them with it.
            if order.count(bridge) > max(order.count(a), order.count(b)):
                assert label[bridge] in (label[a], label[b])
