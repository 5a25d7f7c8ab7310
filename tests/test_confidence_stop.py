"""The engine-side DeepConf stop (actors/confidence_stop.py) against the online rule (ray_pipeline/deepconf.py).

A simulated vLLM engine drives the processor as vLLM's persistent batch does, over generated schedules:
requests join at free rows, leave when they end, move one way and swap (vLLM condenses its batch), some steps are
a partial prefill (the token is discarded, the position is sampled again), some requests are preempted and join
again with their output so far, watched and unwatched requests mix, with different windows and thresholds. Every
watched request must end exactly where `first_stop` cuts the confidences of the distributions it sampled from
(after a preemption, once its window is whole again; never earlier), its stop token at that position and nothing
after it, and no other request may ever see a forced token.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from ray_pipeline.deepconf import first_stop, token_confidences

pytestmark = pytest.mark.fast
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

VOCAB, K, STOP = 40, 5, 3


def processor(capacity: int):
    from actors.confidence_stop import WindowStop

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=capacity))
    return WindowStop(config, torch.device("cpu"), False)


def confidences_of(logits: torch.Tensor) -> np.ndarray:
    """What vLLM returns (raw float32 log-softmax, top k) turned into engine confidences, as the generator does."""
    top = logits.log_softmax(dim=-1, dtype=torch.float32).topk(K, dim=-1).values
    return token_confidences(top.double().numpy())


class Request:
    def __init__(self, rng: random.Random, name: int, watched: bool):
        self.name = name
        length = rng.randint(3, 40)
        gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
        # Peaked and flat stretches, so windows cross thresholds.
        scale = torch.tensor([rng.choice([0.3, 1.0, 4.0]) for _ in range(length)])[:, None]
        self.logits = torch.randn((length, VOCAB), generator=gen) * scale
        self.window = rng.randint(1, 6)
        conf = confidences_of(self.logits)
        self.threshold = float(np.quantile(conf, rng.uniform(0.1, 0.9)))
        self.watched = watched
        self.output: list[int] = []
        self.forced_at: list[int] = []
        # Output lengths at which it joined the batch: 0, then again after each preemption.
        self.starts: list[int] = []

    def params(self):
        from actors.confidence_stop import stop_args

        extra = stop_args(self.threshold, self.window, K, STOP) if self.watched else None
        return SimpleNamespace(extra_args=extra)

    def expected_stop(self) -> int | None:
        """The online rule's stop, where the window is whole since the request last joined: a preempted request
        starts its window over when it comes back, so it may stop later than the rule says, never earlier."""
        if not self.watched:
            return None
        if len(self.starts) == 1:
            return first_stop(confidences_of(self.logits), self.window, self.threshold)
        units = np.rint(confidences_of(self.logits) * 2**16).astype(np.int64)
        for p in range(len(units)):
            start = max(q for q in self.starts if q <= p)
            if p + 1 - start >= self.window and units[p + 1 - self.window : p + 1].sum() / (self.window * 2**16) < (
                self.threshold
            ):
                return p + 1
        return None


def run_schedule(seed: int) -> list[Request]:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    rng = random.Random(seed)
    capacity = rng.randint(2, 6)
    proc = processor(capacity)
    waiting = [Request(rng, i, watched=rng.random() < 0.75) for i in range(rng.randint(4, 14))]
    done: list[Request] = []
    batch: list[Request | None] = []
    while waiting or any(batch):
        removed, added, moved = [], [], []
        # Finished requests leave; vLLM then condenses the batch by moving later rows into the holes.
        for row, req in enumerate(batch):
            if req is not None and (req.output[-1:] == [STOP] and req.forced_at or len(req.output) == len(req.logits)):
                removed.append(row)
                batch[row] = None
                done.append(req)
        # vLLM preempts a running request (its KV cache is needed): it leaves the batch and later joins again with
        # its output so far.
        for row, req in enumerate(batch):
            if req is not None and row not in removed and req.output and rng.random() < 0.03:
                removed.append(row)
                batch[row] = None
                waiting.insert(rng.randint(0, len(waiting)), req)
        while waiting and (None in batch or len(batch) < capacity) and rng.random() < 0.8:
            req = waiting.pop(0)
            req.starts.append(len(req.output))
            row = batch.index(None) if None in batch else len(batch)
            if row == len(batch):
                batch.append(None)
            batch[row] = req
            added.append((row, req.params(), [1, 2], req.output))
        if rng.random() < 0.5 and len(batch) > 1:
            a, b = rng.sample(range(len(batch)), 2)
            if batch[a] is not None and batch[b] is not None:
                batch[a], batch[b] = batch[b], batch[a]
                moved.append((a, b, MoveDirectionality.SWAP))
            elif batch[a] is not None:
                batch[b], batch[a] = batch[a], None
                moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
        while batch and batch[-1] is None:
            batch.pop()
        changed = bool(removed or added or moved)
        proc.update_state(BatchUpdate(len(batch), removed, added, moved) if changed else None)
        if not batch:
            continue
        logits = torch.stack(
            [req.logits[min(len(req.output), len(req.logits) - 1)] if req else torch.zeros(VOCAB) for req in batch]
        )
        out = proc.apply(logits.clone())
        for row, req in enumerate(batch):
            if req is None:
                continue
            forced = bool(torch.isinf(out[row]).sum() == VOCAB - 1 and out[row, STOP] == 0)
            if rng.random() < 0.15 and not req.output:
                continue  # a partial prefill: the sampled token is discarded
            if forced:
                req.forced_at.append(len(req.output) + 1)
                req.output.append(STOP)
            else:
                assert torch.equal(out[row], logits[row]), "an unforced row's logits changed"
                req.output.append(7)
    return done


@pytest.mark.parametrize("seed", range(40))
def test_every_watched_request_ends_where_the_online_rule_stops_it(seed):
    requests = run_schedule(seed)
    assert requests
    for req in requests:
        stop = req.expected_stop()
        if stop is None:
            assert req.forced_at == [] and len(req.output) == len(req.logits)
        else:
            assert req.forced_at == [stop] and len(req.output) == stop and req.output[-1] == STOP


def test_the_schedules_cover_moves_swaps_prefills_and_unwatched_rows():
    seen = {"stopped": 0, "unstopped": 0, "unwatched": 0, "preempted": 0}
    for seed in range(40):
        for req in run_schedule(seed):
            key = "unwatched" if not req.watched else "stopped" if req.forced_at else "unstopped"
            seen[key] += 1
            seen["preempted"] += len(req.starts) > 1
    assert min(seen.values()) > 10, seen
