"""Scorer actor: one teacher-forced forward pass of the model over prompt + candidate.

The pass yields every per-token score (from the final hidden states), the response-mean hidden
state of every layer (for Chain-of-Embedding) and, with --self_eval, one extra batched pass per
reasoning step asking the model whether that step is correct.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pyarrow as pa

from ray_pipeline.answers import extract_boxed, grade
from ray_pipeline.config import RunConfig
from ray_pipeline.errors import PipelineError
from ray_pipeline.model import resolve_model
from ray_pipeline.prompts import build_self_eval_prompt, self_eval_options
from ray_pipeline.scores import (
    coe_transitions,
    combined_self_certainty,
    masked_mean,
    masked_token_scores,
    mixed_certainty,
    option_probability,
    step_index,
    step_means,
    step_texts,
)
from ray_pipeline.shards import SHARD_SCHEMA


class ScorerActor:
    """Ray Data callable class: candidate rows in, the same rows with their scores out."""

    def __init__(self, config: RunConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        path = resolve_model(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype).to(self.device).eval()
        self.decoder = self.model.get_decoder()
        if not hasattr(self.decoder, "layers"):
            raise PipelineError(f"{config.model_path}: the decoder has no `layers` list, which CoE features need")
        head = self.model.get_output_embeddings()
        self.weight, self.bias = head.weight, head.bias
        self.vocab_size = self.weight.shape[0]
        self.options = self._option_ids() if config.self_eval else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        step = self.config.score_batch_size
        for start in range(0, len(rows), step):
            self._score(rows[start : start + step])
        if self.config.self_eval:
            self._self_evaluate(rows)
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)

    def _score(self, rows: list[dict]) -> None:
        torch = self.torch
        for r in rows:
            if r.get("error"):
                # An error row has neither prompt nor response: one stand-in token makes it an empty
                # response, scored NaN like any other, without sending its (too long) prompt through.
                r["prompt_token_ids"] = [self.tokenizer.eos_token_id or 0]
        seqs = [r["prompt_token_ids"] + r["token_ids"] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        # Position p predicts token p + 1: response token j is predicted at len(prompt) - 1 + j.
        predicts = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, (r, seq) in enumerate(zip(rows, seqs)):
            ids[b, : len(seq)] = torch.tensor(seq)
            attention[b, : len(seq)] = 1
            first, n = len(r["prompt_token_ids"]) - 1, len(r["token_ids"])
            targets[b, first : first + n] = torch.tensor(r["token_ids"], dtype=torch.long)
            predicts[b, first : first + n] = True
        predicts = predicts.to(self.device)
        with torch.inference_mode(), self._layer_means(predicts) as layer_means:
            hidden = self.decoder(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
            hidden = hidden.last_hidden_state
            per_row = masked_token_scores(
                hidden,
                self.weight,
                targets.to(self.device),
                predicts,
                bias=self.bias,
                token_chunk=self.config.score_chunk_tokens,
                vocab_chunk=self.config.score_chunk_vocab,
                top_k=self.config.deepconf_top_k,
            )
            # h_0..h_{L-1} are the layers' inputs, h_L the final (normed) output: HF's hidden_states.
            means = torch.stack([*layer_means, masked_mean(hidden, predicts)], dim=1).cpu()
        for r, scores, row_means in zip(rows, per_row, means):
            r.update(self._aggregate(r, scores, row_means))
            if r.get("error"):
                r["prompt_token_ids"] = []

    @contextmanager
    def _layer_means(self, mask):
        """Collects each decoder layer's input hidden state, averaged over the `mask` positions."""
        means = []

        def record(module, args, kwargs):
            means.append(masked_mean(args[0] if args else kwargs["hidden_states"], mask))

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.decoder.layers]
        try:
            yield means
        finally:
            for handle in handles:
                handle.remove()

    def _aggregate(self, row: dict, scores, layer_means) -> dict:
        entropy, certainty, logprob, confidence = (
            t.cpu() for t in (scores.entropy, scores.self_certainty, scores.logprob, scores.confidence)
        )
        # batch_decode([]) returns [""], not [].
        pieces = self.tokenizer.batch_decode([[t] for t in row["token_ids"]]) if row["token_ids"] else []
        steps = step_index(pieces)
        step_sc, step_h = step_means(certainty, steps), step_means(entropy, steps)
        pred = extract_boxed(row["text"])
        out = {
            "token_count": len(row["token_ids"]),
            "pred": pred,
            "correct": None if row["gold"] is None else grade(pred, row["gold"]),
            "token_entropy": entropy.tolist(),
            "token_self_certainty": certainty.tolist(),
            "token_logprob": logprob.tolist(),
            "token_confidence": confidence.tolist(),
            "step_self_certainty": step_sc.tolist(),
            "step_entropy": step_h.tolist(),
            "step_texts": step_texts(pieces, steps),
            "step_self_eval": None,
            "vocab_size": self.vocab_size,
        }
        if not steps:
            # An empty response has no confidence: NaN scores rank it last in every method.
            nan = math.nan
            return out | {
                "mean_entropy": nan,
                "mean_self_certainty": nan,
                "mean_logprob": nan,
                "step_min_self_certainty": nan,
                "step_mean_self_certainty": nan,
                "self_certainty_score": nan,
                "lowest_step": None,
                "lowest_step_text": None,
                "coe_magnitude": None,
                "coe_angle": None,
                "coe_span_magnitude": nan,
                "coe_span_angle": nan,
            }
        token_mean, token_entropy = certainty.double().mean().item(), entropy.double().mean().item()
        cfg = self.config
        token_level = mixed_certainty(token_mean, token_entropy, cfg.lambda_weight, self.vocab_size)
        step_level = mixed_certainty(step_sc.double(), step_h.double(), cfg.lambda_weight, self.vocab_size)
        lowest = int(step_level.argmin())
        coe = coe_transitions(layer_means)
        return out | {
            "mean_entropy": token_entropy,
            "mean_self_certainty": token_mean,
            "mean_logprob": logprob.double().mean().item(),
            "step_min_self_certainty": step_sc.min().item(),
            "step_mean_self_certainty": step_sc.double().mean().item(),
            "self_certainty_score": combined_self_certainty(token_level, step_level[lowest].item(), cfg.alpha),
            "lowest_step": lowest,
            "lowest_step_text": out["step_texts"][lowest],
            "coe_magnitude": coe.magnitude.tolist(),
            "coe_angle": coe.angle.tolist(),
            "coe_span_magnitude": coe.span_magnitude,
            "coe_span_angle": coe.span_angle,
        }

    def _option_ids(self) -> list[int]:
        """Token ids of the "correct" and "incorrect" answers (the first token of each)."""
        ids = [self.tokenizer.encode(o, add_special_tokens=False)[:1] for o in self_eval_options(self.config.prompt)]
        if not all(ids) or ids[0] == ids[1]:
            raise PipelineError(f"{self.config.model_path}: the tokenizer cannot tell the self-eval answers apart")
        return [i[0] for i in ids]

    def _self_evaluate(self, rows: list[dict]) -> None:
        """Fills `step_self_eval`: for each step, P(correct) normalized over the two answers."""
        prompts, owners = [], []
        for b, r in enumerate(rows):
            texts = r["step_texts"]
            for s in range(len(texts)):
                prompts.append(
                    build_self_eval_prompt(r["problem"], texts[:s], texts[s], self.config.prompt, self.tokenizer)
                )
                owners.append(b)
        probabilities = []
        step = self.config.score_batch_size
        for start in range(0, len(prompts), step):
            probabilities += self._option_probabilities(prompts[start : start + step])
        for b, r in enumerate(rows):
            r["step_self_eval"] = [p for p, owner in zip(probabilities, owners) if owner == b]

    def _option_probabilities(self, prompts: list[str]) -> list[float]:
        torch = self.torch
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        lengths = torch.tensor([len(e) for e in encoded])
        # Right padding: positions count from 0 in every row, and only each row's last position is read.
        ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, e in enumerate(encoded):
            ids[b, : len(e)] = torch.tensor(e)
            attention[b, : len(e)] = 1
        with torch.inference_mode():
            hidden = self.decoder(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
            rows = torch.arange(len(encoded), device=self.device)
            last = hidden.last_hidden_state[rows, (lengths - 1).to(self.device)]
            bias = None if self.bias is None else self.bias[self.options]
            return option_probability(last, self.weight[self.options], bias).cpu().tolist()
