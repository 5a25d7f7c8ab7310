"""Confidence scores as pure functions on tensors.

For every response token t the model's next-token distribution p = softmax(z) (raw logits,
temperature 1) gives:

- entropy            H_t  = -sum_j p_j log p_j
- self-certainty     SC_t = KL(U || p) = -log V - (1/V) sum_j log p_j     (U uniform over V)
- log-probability    LP_t = log p_{y_t} of the token that was sampled

All three follow from four per-position reductions over the vocabulary: log Z, E_p[z],
mean_j z_j and z_{y_t}. `token_scores` computes them chunk by chunk over positions and over the
vocabulary (an online log-sum-exp), so at most `[token_chunk, vocab_chunk]` float32 logits
exist at once, never `[batch, tokens, vocab]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """Per-token scores of one or more responses, float32 `[T]` each."""

    entropy: torch.Tensor
    self_certainty: torch.Tensor
    logprob: torch.Tensor


def logit_statistics(logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Scores from full logits `[T, V]` (the unchunked definition, used for small inputs and tests)."""
    logp = torch.log_softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    entropy = -(logp.exp() * logp).sum(-1)
    self_certainty = -math.log(vocab) - logp.mean(-1)
    logprob = logp.gather(-1, targets[:, None]).squeeze(-1)
    return TokenScores(entropy, self_certainty, logprob)


def token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_chunk: int = 256,
    vocab_chunk: int = 16384,
) -> TokenScores:
    """Scores of logits `hidden @ weight.T (+ bias)` for `hidden [T, D]`, `weight [V, D]`, `targets [T]`.

    Logits are formed in float32 one `[token_chunk, vocab_chunk]` tile at a time.
    """
    parts = [
        _chunk_scores(hidden[s : s + token_chunk], weight, bias, targets[s : s + token_chunk], vocab_chunk)
        for s in range(0, hidden.shape[0], token_chunk)
    ]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenScores(empty, empty.clone(), empty.clone())
    return TokenScores(*(torch.cat([getattr(p, n) for p in parts]) for n in ("entropy", "self_certainty", "logprob")))


def _chunk_scores(h, weight, bias, targets, vocab_chunk) -> TokenScores:
    h = h.float()
    vocab = weight.shape[0]
    # Running max m, s = sum exp(z - m), a = sum exp(z - m) (z - m): H = log s - a / s.
    m = s = a = None
    sum_z = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    target_z = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for v0 in range(0, vocab, vocab_chunk):
        z = h @ weight[v0 : v0 + vocab_chunk].float().T
        if bias is not None:
            z = z + bias[v0 : v0 + vocab_chunk].float()
        sum_z += z.sum(-1, dtype=torch.float64)
        in_chunk = (targets >= v0) & (targets < v0 + z.shape[1])
        if in_chunk.any():
            rows = in_chunk.nonzero().squeeze(-1)
            target_z[rows] = z[rows, targets[rows] - v0]
        z_max = z.max(-1).values
        if m is None:
            m = z_max
            e = torch.exp(z - m[:, None])
            s = e.sum(-1)
            a = (e * (z - m[:, None])).sum(-1)
            continue
        new_m = torch.maximum(m, z_max)
        scale = torch.exp(m - new_m)
        e = torch.exp(z - new_m[:, None])
        # Re-centre the old sums on the new max: (z - m) = (z - m') + (m' - m).
        a = scale * (a + (m - new_m) * s) + (e * (z - new_m[:, None])).sum(-1)
        s = scale * s + e.sum(-1)
        m = new_m
    log_z = m + torch.log(s)
    entropy = torch.log(s) - a / s
    self_certainty = (log_z.double() - sum_z / vocab - math.log(vocab)).float()
    logprob = target_z - log_z
    return TokenScores(entropy.clamp_min(0.0), self_certainty.clamp_min(0.0), logprob)


def masked_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_chunk: int = 256,
    vocab_chunk: int = 16384,
) -> list[TokenScores]:
    """Per-row scores of a padded batch: `hidden [B, L, D]`, `targets`/`mask [B, L]`.

    Row b's scores cover the positions where `mask[b]` is true, in order; padding never
    reaches the vocabulary reduction.
    """
    flat = token_scores(
        hidden[mask], weight, targets[mask], bias=bias, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    counts = mask.sum(-1).tolist()
    split = [t.split(counts) for t in (flat.entropy, flat.self_certainty, flat.logprob)]
    return [TokenScores(*(part[i] for part in split)) for i in range(len(counts))]


def step_index(pieces: list[str]) -> list[int]:
    """Step number of each response token, from the decoded text of each token.

    Rule: a step ends with the token that completes a blank line ("\\n\\n"); a response without
    any blank line is split at single newlines instead. A step is never empty, and text after
    the last break (the final answer line) is the last step.
    """
    sep = "\n\n" if "\n\n" in "".join(pieces) else "\n"
    steps, current, step_text = [], 0, ""
    for piece in pieces:
        steps.append(current)
        start = max(0, len(step_text) - len(sep) + 1)
        step_text += piece
        # Search from just before this piece: a separator may straddle two tokens ("\n" + "\n").
        if step_text.find(sep, start) != -1:
            current, step_text = current + 1, ""
    return steps


def step_means(values: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Mean of `values [T]` within each step (steps numbered 0..S-1 in order)."""
    if values.numel() == 0:
        return values.new_zeros(0)
    index = torch.as_tensor(steps, device=values.device)
    count = int(index.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(0, index, values.double())
    sizes = torch.bincount(index, minlength=count).double()
    return (sums / sizes).float()


def combined_self_certainty(token_mean: float, step_min: float, alpha: float, vocab_size: int) -> float:
    """alpha * token level + (1 - alpha) * step level, both in units of log V.

    Token level is the mean self-certainty over the response's tokens; step level is the
    self-certainty of its least certain step (the weakest link of the reasoning, the original's
    "key step"). Dividing by log V, the entropy of the uniform distribution, makes the score a
    dimensionless number comparable across vocabularies; within one model it is a constant
    factor and changes no ranking.
    """
    return (alpha * token_mean + (1.0 - alpha) * step_min) / math.log(vocab_size)
