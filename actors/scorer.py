"""Scorer actor: one teacher-forced forward pass of the model over prompt + candidate."""

from __future__ import annotations

import math

import pyarrow as pa

from ray_pipeline.answers import extract_boxed, grade
from ray_pipeline.config import RunConfig
from ray_pipeline.model import resolve_model
from ray_pipeline.scores import combined_self_certainty, masked_token_scores, step_index, step_means
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
        head = self.model.get_output_embeddings()
        self.weight, self.bias = head.weight, head.bias
        self.vocab_size = self.weight.shape[0]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        step = self.config.score_batch_size
        for start in range(0, len(rows), step):
            self._score(rows[start : start + step])
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)

    def _score(self, rows: list[dict]) -> None:
        torch = self.torch
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
        with torch.inference_mode():
            hidden = self.model.get_decoder()(
                input_ids=ids.to(self.device), attention_mask=attention.to(self.device)
            ).last_hidden_state
            per_row = masked_token_scores(
                hidden,
                self.weight,
                targets.to(self.device),
                predicts.to(self.device),
                bias=self.bias,
                token_chunk=self.config.score_chunk_tokens,
                vocab_chunk=self.config.score_chunk_vocab,
            )
        for r, scores in zip(rows, per_row):
            r.update(self._aggregate(r, scores))

    def _aggregate(self, row: dict, scores) -> dict:
        entropy, certainty, logprob = (t.cpu() for t in (scores.entropy, scores.self_certainty, scores.logprob))
        # batch_decode([]) returns [""], not [].
        pieces = self.tokenizer.batch_decode([[t] for t in row["token_ids"]]) if row["token_ids"] else []
        steps = step_index(pieces)
        per_step = step_means(certainty, steps)
        pred = extract_boxed(row["text"])
        out = {
            "token_count": len(row["token_ids"]),
            "pred": pred,
            "correct": None if row["gold"] is None else grade(pred, row["gold"]),
            "token_entropy": entropy.tolist(),
            "token_self_certainty": certainty.tolist(),
            "token_logprob": logprob.tolist(),
            "step_self_certainty": per_step.tolist(),
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
            }
        lowest = int(per_step.argmin())
        token_mean, step_min = certainty.double().mean().item(), per_step.min().item()
        return out | {
            "mean_entropy": entropy.double().mean().item(),
            "mean_self_certainty": token_mean,
            "mean_logprob": logprob.double().mean().item(),
            "step_min_self_certainty": step_min,
            "step_mean_self_certainty": per_step.double().mean().item(),
            "self_certainty_score": combined_self_certainty(token_mean, step_min, self.config.alpha, self.vocab_size),
            "lowest_step": lowest,
            "lowest_step_text": "".join(p for p, s in zip(pieces, steps) if s == lowest),
        }
