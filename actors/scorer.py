"""Scorer actor: teacher-forced forward passes of the model over prompt + candidate.

A pass yields every per-token score (from the final hidden states), the response-mean hidden
state of every layer (for Chain-of-Embedding) and, with --self_eval, extra passes asking the
model whether each reasoning step is correct.

Passes (`--score_pass`): one per candidate (no padding), one right-padded pass over a problem's N
candidates (N times fewer, larger passes: a GPU is launch-bound on one candidate), or a problem's
prompt once and then each response on the prompt's cached keys and values (prefix: a CPU's cost is
its tokens, and the prompt is most of them at small max_tokens). Every mode works on one fixed
group of candidates, and the generators hand on
whole problems (one row per problem), so a candidate's stored values never depend on which rows
Ray Data put in its batch: a shard redone after an interruption equals the uninterrupted one.
While the device runs one pass, the host turns the previous pass's results into columns.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager

import pyarrow as pa

from ray_pipeline.columns import candidate_rows, empty_scores
from ray_pipeline.config import RunConfig, resolve_scoring
from ray_pipeline.errors import PipelineError
from ray_pipeline.model import ensure_pad_token, prefix_cache_exact, resolve_model
from ray_pipeline.prompts import build_self_eval_prompt, self_eval_options
from ray_pipeline.scores import (
    coe_transitions,
    half_head,
    newline_table,
    option_probability,
    response_means,
    step_means,
    step_spans,
    token_scores,
    token_steps,
)
from ray_pipeline.shards import SHARD_SCHEMA
from ray_pipeline.timeline import mark, mark_process_start


class ScorerActor:
    """Ray Data callable class: problem rows (each with its N candidates) in, one scored row per candidate out.

    Candidate rows are taken too (tests, benchmarks): a problem's candidates are then those in the batch.
    """

    def __init__(self, config: RunConfig):
        mark_process_start("scorer process started")
        mark("scorer init")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        mark("scorer imported torch and transformers")

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The pipeline resolves these for the cluster; an actor made directly resolves them for its own device.
        self.config = config = resolve_scoring(config, on_gpu=self.device == "cuda")
        # Host work here is many small ops on short tensors, where thread pools only add overhead: the
        # actor's CPUs bound torch's threads and the tokenizer's (on a 64-core GPU machine, unbounded,
        # jobs.bench.scorer's host stage took 63 ms a candidate against 1.3 ms on 2 cores).
        torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = resolve_model(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype).to(self.device).eval()
        self.decoder = self.model.get_decoder()
        if not hasattr(self.decoder, "layers"):
            raise PipelineError(f"{config.model_path}: the decoder has no `layers` list, which CoE features need")
        head = self.model.get_output_embeddings()
        # The statistics form float32 logits: from a bf16/fp16 head directly where the device can
        # (float32 accumulation and output), else from a float32 copy made once, not in every pass.
        self.weight = head.weight if half_head(head.weight) else head.weight.float()
        self.bias = None if head.bias is None else head.bias.float()
        if self.device == "cuda" and head.weight.dtype in (torch.bfloat16, torch.float16):
            # TF32 holds bf16 and fp16 values exactly, so a float32 matmul of them loses nothing on tensor cores.
            torch.backends.cuda.matmul.allow_tf32 = True
        self.token_chunk, self.vocab_chunk = config.score_chunk_tokens, config.score_chunk_vocab
        # A model whose cache cannot be cut back to the prompt scores prefix passes one candidate at a time.
        self.prefix_passes = config.score_pass == "prefix" and prefix_cache_exact(self.model.config)
        self.group_passes = config.score_pass == "problem" or self.prefix_passes
        ensure_pad_token(self.tokenizer)
        self.vocab_size = self.weight.shape[0]
        self.options = self._option_ids() if config.self_eval else None
        # Step boundaries come from each token's decoded text: decode the vocabulary once, not every token.
        size = max(self.vocab_size, len(self.tokenizer))
        pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        self.newlines = newline_table(pieces + [""] * (size - len(pieces)))
        mark("scorer ready")
        # Seconds per stage (jobs.bench.scorer reads it); with `synchronize`, device work is waited
        # for at each stage's end so it is attributed to that stage, at the cost of the overlap.
        self.profile: dict[str, float] = defaultdict(float)
        self.synchronize = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Problem rows (`GENERATED_SCHEMA`, from the generators) or candidate rows in; scored candidate rows out."""
        rows = candidate_rows(batch)
        pending = None
        measure = self._measure_prefix if self.prefix_passes else self._measure
        for group in self.passes(rows):
            measured = measure(group)
            if pending is not None:
                self._finish(*pending)
            pending = (group, measured)
        if pending is not None:
            self._finish(*pending)
        start = time.perf_counter()
        for row in rows:
            if not scorable(row):
                # No response tokens (an empty response or an error row): NaN scores rank it last in every method.
                row.update(empty_scores(self.vocab_size))
        self._tick("host", start)
        if self.config.self_eval:
            start = time.perf_counter()
            for row in rows:
                self._self_evaluate(row)
            self._tick("self_eval", start)
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)

    def passes(self, rows: list[dict]) -> list[list[dict]]:
        """The candidates of each forward pass: one each, or a problem's candidates together (`--score_pass`).

        A problem's candidates, in candidate order, fill passes of at most `score_pass_tokens` padded tokens;
        prefix passes take all of them (one response at a time on the prompt). That grouping depends only
        on the problem, which the generators hand on whole, never on the batch.
        """
        rows = [r for r in rows if scorable(r)]
        if not self.group_passes:
            return [[r] for r in rows]
        problems: dict[tuple, list[dict]] = {}
        for row in rows:
            # Keyed by the prompt too: a prefix pass needs one prompt, and a problem's candidates share it.
            problems.setdefault((row["problem_id"], tuple(row["prompt_token_ids"])), []).append(row)
        passes = []
        for candidates in problems.values():
            if self.prefix_passes:
                passes.append(sorted(candidates, key=lambda r: r["candidate_index"]))
                continue
            group, width = [], 0
            for row in sorted(candidates, key=lambda r: r["candidate_index"]):
                length = len(row["prompt_token_ids"]) + len(row["token_ids"])
                if group and (len(group) + 1) * max(width, length) > self.config.score_pass_tokens:
                    passes.append(group)
                    group, width = [], 0
                group.append(row)
                width = max(width, length)
            passes.append(group)
        return passes

    def pass_inputs(self, group: list[dict]):
        """The token ids `[B, L]` of one pass, right-padded (the benchmark reuses them)."""
        return self._right_padded([r["prompt_token_ids"] + r["token_ids"] for r in group])

    def _right_padded(self, seqs: list[list[int]]):
        """`seqs` as one `[B, L]` batch padded on the right, whatever side the tokenizer pads by default.

        Right padding needs no attention mask: positions count from 0 in every row, and causal attention
        never lets a real position see the padding after it. So a padded row's real positions compute what
        the row alone would (the values read are only those), and the kernels keep their causal fast path.
        """
        padded = self.tokenizer.pad({"input_ids": seqs}, padding=True, padding_side="right", return_tensors="pt")
        return padded["input_ids"].to(self.device)

    def _tick(self, stage: str, start: float) -> float:
        if self.synchronize and self.device == "cuda":
            self.torch.cuda.synchronize()
        now = time.perf_counter()
        self.profile[stage] += now - start
        return now

    def _measure(self, group: list[dict]):
        """Queues one pass and its scores; returns the results (on the host once copied) and their copy event."""
        torch = self.torch
        ids = self.pass_inputs(group)
        width = ids.shape[1]
        # Position p predicts token p + 1: response token j of a row is predicted at len(prompt) - 1 + j.
        # The response positions as flat indices into [B * L] and as averaging weights [B, L], built on the
        # host, so that nothing on the device waits for the host to learn their shapes.
        positions, weights = [], torch.zeros(ids.shape, dtype=torch.float32)
        for b, row in enumerate(group):
            first, n = len(row["prompt_token_ids"]) - 1, len(row["token_ids"])
            positions.append(torch.arange(b * width + first, b * width + first + n))
            weights[b, first : first + n] = 1.0 / n
        index = torch.cat(positions).to(self.device, non_blocking=True)
        weights = weights.to(self.device, non_blocking=True)
        targets = torch.tensor([t for r in group for t in r["token_ids"]], dtype=torch.long)
        targets = targets.to(self.device, non_blocking=True)
        start = time.perf_counter()
        with torch.inference_mode(), self._layer_means(weights) as layer_means:
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
            start = self._tick("forward", start)
            values = self._token_values(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), targets)
            start = self._tick("statistics", start)
            # h_0..h_{L-1} are the layers' inputs, h_L the final (normed) output: HF's hidden_states.
            means = torch.stack([*layer_means, response_means(hidden, weights)], dim=1)
        if self.device == "cuda":
            # Pinned host memory and a non-blocking copy: the host waits only when it reads the results.
            out = (torch.empty(values.shape, pin_memory=True), torch.empty(means.shape, pin_memory=True))
            out[0].copy_(values, non_blocking=True)
            out[1].copy_(means, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return out, event
        return (values, means), None

    def _measure_prefix(self, group: list[dict]):
        """One problem's candidates: the prompt in one pass, then each response on the prompt's cached keys and
        values, so the prompt's tokens are computed once, not once per candidate. Results as `_measure`'s.

        A response's values equal a full pass's up to rounding: causal attention gives the prompt's positions
        the same states with or without the response after them (for the models `prefix_cache_exact` accepts).
        """
        torch = self.torch
        prompt = torch.tensor([group[0]["prompt_token_ids"]], device=self.device)
        layers = len(self.decoder.layers)
        start = time.perf_counter()
        hidden, means = [], []
        # The last prompt position predicts every response's first token: each row's first scored position.
        # Its state in every layer (copies, so the prompt pass's states are freed).
        last: list = [None] * layers

        def keep_last(i, state):
            last[i] = state[:, -1:].clone()

        with torch.inference_mode(), self._layer_inputs(keep_last) as reduce:
            out = self.decoder(input_ids=prompt, use_cache=True)
            cache = out.past_key_values
            if not hasattr(cache, "crop"):
                raise PipelineError(
                    f"{self.config.model_path}: its decoder returns no croppable cache: pass --score_pass candidate"
                )
            final_last = out.last_hidden_state[:, -1:].clone()
            del out
            if any(state is None for state in last):
                raise PipelineError(f"{self.config.model_path}: a decoder layer ran without its forward hook")
            for row in group:
                ids = row["token_ids"][:-1]  # the last token is only a target: no position reads its state
                weights = torch.full((1, len(ids) + 1), 1.0 / (len(ids) + 1), device=self.device)
                row_means: list = [None] * layers

                def layer_mean(i, state, weights=weights, row_means=row_means):
                    # Reduced as the layer runs, as `_measure`'s hooks do: no layer's states are kept.
                    row_means[i] = response_means(torch.cat([last[i], state], dim=1), weights)

                final = final_last
                if ids:
                    reduce[0] = layer_mean
                    step = torch.tensor([ids], device=self.device)
                    state = self.decoder(input_ids=step, past_key_values=cache, use_cache=True).last_hidden_state
                    cache.crop(-len(ids))  # back to the prompt alone for the next response
                    final = torch.cat([final_last, state], dim=1)
                else:
                    row_means = [response_means(state, weights) for state in last]
                if any(m is None for m in row_means):
                    raise PipelineError(f"{self.config.model_path}: a decoder layer ran without its forward hook")
                # h_0..h_{L-1} (the layers' inputs) and h_L (the final normed output), as in `_measure`.
                means.append(torch.cat([*row_means, response_means(final, weights)]))
                hidden.append(final[0])
            start = self._tick("forward", start)
            targets = torch.tensor([t for r in group for t in r["token_ids"]], dtype=torch.long, device=self.device)
            values = self._token_values(torch.cat(hidden), targets)
            self._tick("statistics", start)
        return (values.cpu(), torch.stack(means).cpu()), None

    def _token_values(self, hidden, targets):
        """Entropy, self-certainty, log-prob and confidence `[4, T]` of `targets [T]` from final states `[T, D]`."""
        scores = token_scores(
            hidden,
            self.weight,
            targets,
            bias=self.bias,
            token_chunk=self.token_chunk,
            vocab_chunk=self.vocab_chunk,
            top_k=self.config.deepconf_top_k,
        )
        return self.torch.stack([scores.entropy, scores.self_certainty, scores.logprob, scores.confidence])

    @contextmanager
    def _layer_inputs(self, reduce):
        """Hands each decoder layer's input hidden state to `reduce[0](layer index, state)` as the layer runs.

        Yields the one-element list, so the caller can swap the reducer between forward passes.
        """
        current = [reduce]

        def hook(index):
            def record(module, args, kwargs):
                current[0](index, args[0] if args else kwargs["hidden_states"])

            return record

        handles = [
            layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.decoder.layers)
        ]
        try:
            yield current
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _layer_means(self, weights):
        """Collects each decoder layer's input hidden state, averaged over each row's response positions."""
        means = []

        def record(module, args, kwargs):
            start = time.perf_counter()
            means.append(response_means(args[0] if args else kwargs["hidden_states"], weights))
            self._tick("coe_hooks", start)

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.decoder.layers]
        try:
            yield means
        finally:
            for handle in handles:
                handle.remove()

    def _finish(self, group: list[dict], measured) -> None:
        """Fills each row's score columns from its pass's results (host work: steps, texts, lists)."""
        start = time.perf_counter()
        (values, means), event = measured
        if event is not None:
            event.synchronize()
        offset = 0
        for row, row_means in zip(group, means):
            ids = row["token_ids"]
            entropy, certainty, logprob, confidence = values[:, offset : offset + len(ids)]
            offset += len(ids)
            steps = token_steps(self.torch.tensor(ids), self.newlines)
            spans = step_spans(steps)
            step_sc, step_h = step_means(certainty, steps), step_means(entropy, steps)
            coe = coe_transitions(row_means)
            row.update(
                {
                    "token_count": len(ids),
                    "token_entropy": entropy.tolist(),
                    "token_self_certainty": certainty.tolist(),
                    "token_logprob": logprob.tolist(),
                    "token_confidence": confidence.tolist(),
                    "step_self_certainty": step_sc.tolist(),
                    "step_entropy": step_h.tolist(),
                    # Decoding spans, not single tokens: a character split across tokens comes out whole.
                    "step_texts": self.tokenizer.batch_decode([ids[a:b] for a, b in spans]),
                    "step_self_eval": None,
                    "coe_magnitude": coe.magnitude.tolist(),
                    "coe_angle": coe.angle.tolist(),
                    "coe_span_magnitude": coe.span_magnitude,
                    "coe_span_angle": coe.span_angle,
                    "mean_entropy": entropy.double().mean().item(),
                    "mean_self_certainty": certainty.double().mean().item(),
                    "mean_logprob": logprob.double().mean().item(),
                    "step_min_self_certainty": step_sc.min().item(),
                    "step_mean_self_certainty": step_sc.double().mean().item(),
                    "vocab_size": self.vocab_size,
                }
            )
        self._tick("host", start)

    def _option_ids(self) -> list[int]:
        """Token ids of the "correct" and "incorrect" answers (the first token of each)."""
        ids = [self.tokenizer.encode(o, add_special_tokens=False)[:1] for o in self_eval_options(self.config.prompt)]
        if not all(ids) or ids[0] == ids[1]:
            raise PipelineError(f"{self.config.model_path}: the tokenizer cannot tell the self-eval answers apart")
        return [i[0] for i in ids]

    def _self_evaluate(self, row: dict) -> None:
        """Fills `step_self_eval`: for each step, P(correct) normalized over the two answers.

        A candidate's step prompts are batched only with each other, so its values do not depend on its batchmates.
        """
        texts = row["step_texts"]
        prompts = [
            build_self_eval_prompt(row["problem"], texts[:s], texts[s], self.config.prompt, self.tokenizer)
            for s in range(len(texts))
        ]
        probabilities = []
        step = self.config.score_batch_size
        for start in range(0, len(prompts), step):
            probabilities += self._option_probabilities(prompts[start : start + step])
        row["step_self_eval"] = probabilities

    def _option_probabilities(self, prompts: list[str]) -> list[float]:
        torch = self.torch
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        lengths = torch.tensor([len(e) for e in encoded])
        with torch.inference_mode():
            # Each row's last real position is read: right padding (see _right_padded).
            hidden = self.decoder(input_ids=self._right_padded(encoded), use_cache=False)
            rows = torch.arange(len(encoded), device=self.device)
            last = hidden.last_hidden_state[rows, (lengths - 1).to(self.device)]
            bias = None if self.bias is None else self.bias[self.options]
            return option_probability(last, self.weight[self.options], bias).cpu().tolist()


def scorable(row: dict) -> bool:
    """Whether a candidate gets a forward pass: it has response tokens and no error."""
    return bool(row["token_ids"]) and not row.get("error")

