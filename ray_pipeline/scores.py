"""Confidence scores as pure functions on tensors.

For every response token t the model's next-token distribution p = softmax(z) (raw logits,
temperature 1) gives:

- entropy            H_t  = -sum_j p_j log p_j
- self-certainty     SC_t = KL(U || p) = -log V - (1/V) sum_j log p_j     (U uniform over V)
- log-probability    LP_t = log p_{y_t} of the token that was sampled
- confidence         C_t  = -(1/k) sum_{j in top-k} log p_j   (DeepConf's token confidence)

All four follow from per-position reductions over the vocabulary: log Z, E_p[z], mean_j z_j,
z_{y_t} and the k largest z_j. `token_scores` computes them chunk by chunk over positions and
over the vocabulary (an online log-sum-exp and an online top-k merge), so at most
`[token_chunk, vocab_chunk]` float32 logits exist at once, never `[batch, tokens, vocab]`.

The rest of the module finds the response's steps, averages the per-token scores within them and
turns per-layer hidden states into Chain-of-Embedding features: what the scorer stores. What the
selection methods compute from the stored values (the certainty mix, DeepConf's window
confidences, CoE-R/CoE-C) is in `aggregates.py`, in numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where it is used: the job's driver names the scorer class (which imports this module)
# and must not pay for torch, which only the actors need.
if TYPE_CHECKING:
    import torch


@dataclass
class TokenScores:
    """Per-token scores of one or more responses, float32 `[T]` each."""

    entropy: torch.Tensor
    self_certainty: torch.Tensor
    logprob: torch.Tensor
    confidence: torch.Tensor


SCORE_NAMES = ("entropy", "self_certainty", "logprob", "confidence")
DEEPCONF_TOP_K = 20


def logit_statistics(logits: torch.Tensor, targets: torch.Tensor, top_k: int = DEEPCONF_TOP_K) -> TokenScores:
    """Scores from full logits `[T, V]` (the unchunked definition, used for small inputs and tests)."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    entropy = -(logp.exp() * logp).sum(-1)
    self_certainty = -math.log(vocab) - logp.mean(-1)
    logprob = logp.gather(-1, targets[:, None]).squeeze(-1)
    confidence = -logp.topk(min(top_k, vocab), dim=-1).values.mean(-1)
    return TokenScores(entropy, self_certainty, logprob, confidence)


def token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_chunk: int = 256,
    vocab_chunk: int = 16384,
    top_k: int = DEEPCONF_TOP_K,
) -> TokenScores:
    """Scores of logits `hidden @ weight.T (+ bias)` for `hidden [T, D]`, `weight [V, D]`, `targets [T]`.

    Logits are formed in float32 one `[token_chunk, vocab_chunk]` tile at a time; `top_k` is
    DeepConf's k (capped at V). `weight` is float32, or a bf16/fp16 CUDA head for which `half_head` holds.
    """
    import torch

    parts = [
        _chunk_scores(hidden[s : s + token_chunk], weight, bias, targets[s : s + token_chunk], vocab_chunk, top_k)
        for s in range(0, hidden.shape[0], token_chunk)
    ]
    if not parts:
        return TokenScores(*(hidden.new_zeros(0, dtype=torch.float32) for _ in SCORE_NAMES))
    return TokenScores(*(torch.cat([getattr(p, n) for p in parts]) for n in SCORE_NAMES))


def half_head(weight: torch.Tensor) -> bool:
    """Whether `token_scores` can use this bf16/fp16 head as it is: a matmul of half inputs with float32
    accumulation and float32 output (CUDA), which equals the float32 matmul of the same values (half
    values are exact in float32) at half the memory traffic. Elsewhere the head is converted to float32.
    """
    import torch

    if weight.dtype not in (torch.bfloat16, torch.float16) or not weight.is_cuda:
        return False
    probe = weight[:2]
    try:
        return torch.mm(probe, probe.T, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _chunk_scores(h, weight, bias, targets, vocab_chunk, top_k) -> TokenScores:
    # The half path only for half hidden states (exact in the head's dtype); float32 ones take the float32 head.
    import torch

    half = weight.dtype in (torch.bfloat16, torch.float16) and h.is_cuda and h.dtype == weight.dtype
    h_half = h if half else None
    h = h.float()
    vocab = weight.shape[0]
    # Running max m, s = sum exp(z - m), a = sum exp(z - m) (z - m): H = log s - a / s.
    m = s = a = top = None
    sum_z = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    # The sampled token's logit from its own head row: no data-dependent indexing, which would make a
    # GPU wait for the host (the scorer queues the next pass while this one's results are copied).
    target_z = (h * weight[targets].float()).sum(-1)
    if bias is not None:
        target_z = target_z + bias[targets].float()
    for v0 in range(0, vocab, vocab_chunk):
        if half:
            # Half inputs, float32 accumulation and output (see `half_head`): no float32 copy of the head.
            z = torch.mm(h_half, weight[v0 : v0 + vocab_chunk].T, out_dtype=torch.float32)
        else:
            z = h @ weight[v0 : v0 + vocab_chunk].float().T
        if bias is not None:
            z = z + bias[v0 : v0 + vocab_chunk].float()
        # A float32 sum per chunk (pairwise, error ~1e-7 relative), accumulated in float64 across chunks:
        # a float64 reduction of the whole tile costs as much as the exponentials.
        sum_z += z.sum(-1).double()
        # The k largest logits so far: this chunk's top k merged with the running top k. The chunk's
        # largest is its max, so no separate max pass.
        chunk_top = z.topk(min(top_k, z.shape[1]), dim=-1).values
        z_max = chunk_top[:, 0]
        if top is not None:
            chunk_top = torch.cat([top, chunk_top], dim=-1)
            chunk_top = chunk_top.topk(min(top_k, chunk_top.shape[1]), dim=-1).values
        top = chunk_top
        new_m = z_max if m is None else torch.maximum(m, z_max)
        # z - m' in place: the tile is not needed afterwards.
        d = z.sub_(new_m[:, None])
        e = torch.exp(d)
        chunk_s, chunk_a = e.sum(-1), (e.mul_(d)).sum(-1)
        if m is None:
            m, s, a = new_m, chunk_s, chunk_a
            continue
        scale = torch.exp(m - new_m)
        # Re-centre the old sums on the new max: (z - m) = (z - m') + (m' - m).
        a = scale * (a + (m - new_m) * s) + chunk_a
        s = scale * s + chunk_s
        m = new_m
    log_z = m + torch.log(s)
    entropy = torch.log(s) - a / s
    self_certainty = (log_z.double() - sum_z / vocab - math.log(vocab)).float()
    logprob = target_z - log_z
    # -mean_j (z_j - log Z) over the top k.
    confidence = log_z - top.mean(-1)
    return TokenScores(entropy.clamp_min(0.0), self_certainty.clamp_min(0.0), logprob, confidence.clamp_min(0.0))


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


@dataclass
class NewlineTable:
    """The newline structure of every token's decoded text, bool `[V]` each: what `step_index` reads of a piece.

    Built once per tokenizer (`newline_table`), so `token_steps` finds step boundaries with tensor
    lookups instead of decoding every token.
    """

    has_newline: torch.Tensor
    has_blank_line: torch.Tensor
    starts_newline: torch.Tensor
    ends_newline: torch.Tensor
    empty: torch.Tensor


def newline_table(pieces: list[str]) -> NewlineTable:
    """The table of the pieces `pieces[i]` (token i decoded alone)."""
    import torch

    def flags(test) -> torch.Tensor:
        return torch.tensor([test(p) for p in pieces], dtype=torch.bool)

    return NewlineTable(
        has_newline=flags(lambda p: "\n" in p),
        has_blank_line=flags(lambda p: "\n\n" in p),
        starts_newline=flags(lambda p: p.startswith("\n")),
        ends_newline=flags(lambda p: p.endswith("\n")),
        empty=flags(lambda p: not p),
    )


def token_steps(token_ids: torch.Tensor, table: NewlineTable) -> torch.Tensor:
    """`step_index` of the tokens `token_ids [T]` (int64 `[T]`), from the vocabulary's `NewlineTable`.

    With blank lines as separators, a token ends a step when its own text holds "\\n\\n", or when it
    starts with "\\n" and the previous non-empty piece of the same step ends with one (the separator
    straddles two tokens). Only those straddling pairs, one per blank line, are visited in Python:
    whether a pair completes a separator depends on whether its first piece already ended a step.
    """
    import torch

    if token_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    ids = token_ids.long()
    inside = table.has_blank_line[ids]
    # The non-empty pieces in order: an empty piece leaves the step text unchanged.
    pos = (~table.empty[ids]).nonzero().squeeze(-1)
    pair = table.starts_newline[ids[pos[1:]]] & table.ends_newline[ids[pos[:-1]]]
    if inside.any() or pair.any():
        breaks = inside.clone()
        for j in (pair.nonzero().squeeze(-1) + 1).tolist():
            if not breaks[pos[j - 1]]:
                breaks[pos[j]] = True
    else:
        breaks = table.has_newline[ids]
    counts = breaks.long().cumsum(0)
    return counts - breaks.long()


def step_spans(steps: torch.Tensor) -> list[tuple[int, int]]:
    """`(start, end)` token positions of each step, from the step number of each token."""
    import torch

    if steps.numel() == 0:
        return []
    sizes = torch.bincount(steps).tolist()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends)]


def step_means(values: torch.Tensor, steps) -> torch.Tensor:
    """Mean of `values [T]` within each step (`steps`: the step number 0..S-1 of each value, in order)."""
    import torch

    if values.numel() == 0:
        return values.new_zeros(0)
    index = torch.as_tensor(steps, device=values.device)
    count = int(index.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(0, index, values.double())
    sizes = torch.bincount(index, minlength=count).double()
    return (sums / sizes).float()


def step_texts(pieces: list[str], steps: list[int]) -> list[str]:
    """The text of each step, from the decoded tokens and their step numbers (`step_index`)."""
    texts = [""] * (max(steps) + 1 if steps else 0)
    for piece, step in zip(pieces, steps):
        texts[step] += piece
    return texts


@dataclass
class CoeTransitions:
    """Chain-of-Embedding features of one response, float64.

    `magnitude[l] = ||h_{l+1} - h_l||` and `angle[l] = arccos(cos(h_{l+1}, h_l))` for each of
    the L layer transitions of the response-mean hidden states `h_0..h_L`; `span_magnitude` and
    `span_angle` are the same two quantities from the first layer to the last, which normalize them.
    """

    magnitude: torch.Tensor
    angle: torch.Tensor
    span_magnitude: float
    span_angle: float


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1.0, 1.0))


def coe_transitions(layer_means: torch.Tensor) -> CoeTransitions:
    """Per-transition magnitude and angle changes of `layer_means [L + 1, D]` (h_0 = the embeddings)."""
    h = layer_means.double()
    return CoeTransitions(
        magnitude=(h[1:] - h[:-1]).norm(dim=-1),
        angle=_angle(h[1:], h[:-1]),
        span_magnitude=(h[-1] - h[0]).norm().item(),
        span_angle=_angle(h[-1], h[0]).item(),
    )


def response_means(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each row's weighted mean hidden state, float32 `[B, D]`, of `hidden [B, L, D]` and `weights [B, L]`.

    With weights 1/n on a row's n response positions and 0 elsewhere (padding, the prompt), it is
    that row's mean over its response: a matmul, so nothing depends on the positions' count on the host.
    """
    return (weights[:, None, :].float() @ hidden.float()).squeeze(1)


def option_probability(hidden: torch.Tensor, option_weight: torch.Tensor, option_bias: torch.Tensor | None = None):
    """Probability of the first of two answer options, normalized over the two: float32 `[P]`.

    `hidden [P, D]` is the final hidden state before the answer, `option_weight [2, D]` (and
    `option_bias [2]`) the output-head rows of the two option tokens, so only two logits are formed.
    """
    import torch

    z = hidden.float() @ option_weight.float().T
    if option_bias is not None:
        z = z + option_bias.float()
    return torch.sigmoid(z[:, 0] - z[:, 1])
