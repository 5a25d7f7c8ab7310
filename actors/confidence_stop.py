"""DeepConf online's stop inside vLLM: a batch-level logits processor that ends a final trace at its stop point.

A request that carries `STOP_ARGS` in its `SamplingParams.extra_args` ({"threshold": s, "window": W,
"top_k": k, "token": t}) is watched: at every step the processor takes the engine confidence of the
distribution the request samples from (minus the mean of its top-k raw log-probabilities, rounded to 2^-16
nat as `ray_pipeline.deepconf.token_confidences` rounds it), keeps the request's last W of them as a rolling
sum of integer units, and at the first step whose full window has a mean below s it forces token t (the
model's end-of-sequence token, also in the request's stop_token_ids): the engine ends the request there, with
nothing generated past the stop point. The stopped trace has exactly the length the online rule gives
(`ray_pipeline.deepconf.first_stop`: the window's last position), its last token t in place of a sampled one.

One tensor computation per step serves the whole batch (log-softmax, top-k, the window update and the forced
token on the rows that fall below), with no host sync; the host only reads each watched row's output length,
which says the position being sampled (a step of a partial prefill, whose token vLLM discards, writes the same
position again). This replaces DeepConf's per-request processor (facebookresearch/deepconf,
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
STOP_ARGS = "deepconf_stop"
# ray_pipeline.deepconf.CONFIDENCE_SCALE, repeated so the engine's processes import no project library.
CONFIDENCE_SCALE = 1 << 16


def stop_args(threshold: float, window: int, top_k: int, token: int) -> dict:
    """What a final trace's SamplingParams carry in `extra_args` to be stopped by `WindowStop`."""
    return {STOP_ARGS: {"threshold": float(threshold), "window": int(window), "top_k": int(top_k), "token": int(token)}}


class WindowStop(LogitsProcessor):
    """vLLM v1 logits processor: DeepConf online's stop rule for every watched request of the batch at once."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(STOP_ARGS)
        if args is None:
            return
        missing = {"threshold", "window", "top_k", "token"} - set(args)
        if missing:
            raise ValueError(f"extra_args[{STOP_ARGS!r}] lacks {sorted(missing)}")
        if int(args["window"]) < 1 or int(args["top_k"]) < 1:
            raise ValueError(f"extra_args[{STOP_ARGS!r}] needs window >= 1 and top_k >= 1, got {args}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.capacity = vllm_config.scheduler_config.max_num_seqs
        # Per request slot (stable while a request moves within the batch): its settings and its window.
        self.threshold = np.zeros(self.capacity, dtype=np.float64)
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
            args = (params.extra_args or {}).get(STOP_ARGS) if params is not None else None
            if args is not None:
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
        window = int(args["window"])
        if window > self.ring.shape[1]:
            grown = torch.zeros((self.capacity, window), dtype=torch.int64, device=self.device)
            grown[:, : self.ring.shape[1]] = self.ring
            self.ring = grown
        self.threshold[slot] = float(args["threshold"])
        self.window[slot], self.top_k[slot], self.token[slot] = window, int(args["top_k"]), int(args["token"])
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
        self.rows_list = rows
        self.k = int(self.top_k[slots].max()) if slots else 1
        self.same_k = bool(slots) and bool((self.top_k[slots] == self.k).all())
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
        positions = torch.tensor([len(self.outputs[r]) for r in self.rows_list], dtype=torch.int64).to(
            self.device, non_blocking=True
        )
        # As vLLM's raw log-probs: a float32 log-softmax of the raw logits, then the top k.
        top = logits.index_select(0, rows).log_softmax(dim=-1, dtype=torch.float32).topk(self.k, dim=-1).values
        units = torch.round(-top.double().mean(dim=1) * CONFIDENCE_SCALE).to(torch.int64)
        column = positions % window
        old = self.ring[slots, column]
        self.ring[slots, column] = units
        self.sums.index_add_(0, slots, units - old)
        sums = self.sums.index_select(0, slots)
        whole = positions + 1 - self.start_t >= window
        below = whole & (sums.double() / (window * CONFIDENCE_SCALE).double() < self.limit_t)
        # Rows below their threshold: only their stop token stays possible (no host sync: masks, not branches).
        stop_rows = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        stop_rows.index_copy_(0, rows, below)
        stop_token = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        stop_token.index_copy_(0, rows, self.token_t)
        kept = logits.gather(1, stop_token[:, None])
        logits.masked_fill_(stop_rows[:, None], float("-inf"))
        logits.scatter_(1, stop_token[:, None], torch.where(stop_rows[:, None], torch.zeros_like(kept), kept))
        return logits
