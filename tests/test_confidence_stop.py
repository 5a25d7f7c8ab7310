"""The engine-side DeepConf stop and seeded sampling (actors/confidence_stop.py) against the online rule
(ray_pipeline/deepconf/) and a sampler run on each position alone.

A simulated vLLM engine drives the processor as vLLM's persistent batch does, over generated schedules:
requests join at free rows, leave when they end, move one way and swap (vLLM condenses its batch), some steps are
a partial prefill (the token is discarded, the position is sampled again), some requests are preempted and join
again with their output so far, watched and unwatched requests mix, with different windows and thresholds. Every
watched request must end exactly where `first_stop` cuts the confidences of the distributions it sampled from
(after a preemption, once its window is whole again; never earlier), its stop token at that position and nothing
after it, and no other request may ever see a forced token. A seeded request gets at every position the token that
its seed and that position's logits alone give, whatever the batch, the partial prefills and the preemptions.
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
    def __init__(self, rng: random.Random, name: int, watched: bool, seeded: bool = False):
        self.name = name
        length = rng.randint(3, 40)
        gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
        # Peaked and flat stretches, so windows cross thresholds.
        scale = torch.tensor([rng.choice([0.3, 1.0, 4.0]) for _ in range(length)])[:, None]
        self.logits = torch.randn((length, VOCAB), generator=gen) * scale
        self.seeded = seeded
        self.seed = rng.randint(0, (1 << 31) - 1)
        self.temperature, self.top_p = rng.choice([0.0, 0.7, 1.0]), rng.choice([1.0, 1.0, 0.8])
        if seeded:
            # A sampled token is never the stop token: a stop token in the output is the stop rule's.
            self.logits[:, STOP] = float("-inf")
        self.window = rng.randint(1, 6)
        conf = confidences_of(self.logits)
        self.threshold = float(np.quantile(conf, rng.uniform(0.1, 0.9)))
        self.watched = watched
        self.output: list[int] = []
        self.forced_at: list[int] = []
        # Output lengths at which it joined the batch: 0, then again after each preemption.
        self.starts: list[int] = []

    def params(self):
        from actors.confidence_stop import trace_args

        threshold = self.threshold if self.watched else None
        seed = self.seed if self.seeded else None
        extra = trace_args(seed, self.temperature, self.top_p, threshold, self.window, K, STOP)
        return SimpleNamespace(extra_args=extra)

    def sampled_alone(self, position: int) -> int:
        """The token the seed gives at `position` from that position's logits alone (a batch of one)."""
        from actors.confidence_stop import sample_rows, uniforms

        u = torch.from_numpy(uniforms(np.array([self.seed]), np.array([position])))
        temperature, top_p = torch.tensor([self.temperature]), np.array([self.top_p])
        return int(sample_rows(self.logits[position][None].clone(), temperature, top_p, u)[0])

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


def run_schedule(seed: int, seeded: float = 0.0, requests: list[Request] | None = None) -> list[Request]:
    """Requests (new ones, a share `seeded` of them sampled from their seeds) through a generated schedule."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    rng = random.Random(seed)
    capacity = rng.randint(2, 6)
    proc = processor(capacity)
    if requests is None:
        count = rng.randint(4, 14)
        requests = [Request(rng, i, watched=rng.random() < 0.75, seeded=rng.random() < seeded) for i in range(count)]
    waiting = list(requests)
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
            if req.seeded:
                # Every step of a seeded request is forced: its sampled token, or the stop token.
                assert torch.isfinite(out[row]).sum() == 1 and out[row].max() == 0
                token = int(out[row].argmax())
                req.output.append(token)
                if token == STOP:
                    req.forced_at.append(len(req.output))
            elif forced:
                req.forced_at.append(len(req.output) + 1)
                req.output.append(STOP)
            else:
                assert torch.equal(out[row], logits[row]), "an unforced row's logits changed"
                req.output.append(7)
    return done


@pytest.mark.parametrize("seeded", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(40))
def test_every_watched_request_ends_where_the_online_rule_stops_it(seed, seeded):
    requests = run_schedule(seed, seeded)
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


@pytest.mark.parametrize("seed", range(20))
def test_a_seeded_request_samples_what_its_seed_gives_alone_in_any_schedule(seed):
    rng = random.Random(1000 + seed)
    requests = [Request(rng, i, watched=rng.random() < 0.5, seeded=True) for i in range(rng.randint(4, 12))]
    runs = []
    # Two schedules (other batches, moves, prefills, preemptions) of the same requests.
    for schedule in (seed, seed + 500):
        for req in requests:
            req.output, req.forced_at, req.starts = [], [], []
        run_schedule(schedule, requests=requests)
        for req in requests:
            sampled = req.output[:-1] if req.forced_at else req.output
            assert sampled == [req.sampled_alone(p) for p in range(len(sampled))]
        runs.append({r.name: (list(r.output), len(r.starts) > 1) for r in requests})
    # Where neither schedule preempted a request (a preempted one's window starts over), it ends the same.
    for name, (output, preempted) in runs[0].items():
        again, preempted_again = runs[1][name]
        if not (preempted or preempted_again):
            assert again == output


def test_the_sampler_draws_from_the_temperature_scaled_nucleus():
    from actors.confidence_stop import sample_rows, uniforms

    rows = 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float32).repeat(rows, 1)
    u = torch.from_numpy(uniforms(np.arange(rows), np.full(rows, 7)))
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8)]:
        tokens = sample_rows(logits.clone(), torch.full((rows,), temperature), np.full(rows, top_p), u)
        probs = np.exp(np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float64) / temperature)
        probs /= probs.sum()
        if top_p < 1:
            # The smallest set of most likely tokens whose probability reaches top_p, renormalized.
            keep = np.cumsum(probs) - probs < top_p
            probs = np.where(keep, probs, 0.0) / probs[keep].sum()
        freq = np.bincount(tokens.numpy(), minlength=6) / rows
        assert np.all(freq[probs == 0] == 0)
        # 40,000 draws: a frequency's standard error is at most 0.0025.
        assert np.abs(freq - probs).max() < 0.012, (temperature, top_p, freq, probs)
    greedy = sample_rows(logits[:3].clone(), torch.zeros(3), np.ones(3), u[:3])
    assert greedy.tolist() == [0, 0, 0]


def test_uniforms_are_splitmix64_of_seed_and_position():
    from actors.confidence_stop import uniforms

    def splitmix(seed: int, position: int) -> float:
        mask = (1 << 64) - 1
        z = (seed * 0x9E3779B97F4A7C15 + position + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return (z >> 11) / float(1 << 53)

    rng = np.random.default_rng(3)
    seeds, positions = rng.integers(0, 1 << 31, 200), rng.integers(0, 1 << 16, 200)
    got = uniforms(seeds, positions)
    assert got.tolist() == [splitmix(int(s), int(p)) for s, p in zip(seeds, positions)]
    many = uniforms(np.repeat(np.arange(100), 100), np.tile(np.arange(100), 100))
    assert np.all((many >= 0) & (many < 1)) and abs(many.mean() - 0.5) < 0.01 and len(set(many.tolist())) == 10_000
