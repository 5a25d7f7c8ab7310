"""transformers (`actors/hf_backend.py`): `generate` on one padded batch at a time, on a CPU or a GPU."""

from __future__ import annotations

from ray_pipeline.backends import Backend, register_backend

HF = register_backend(
    Backend(
        name="hf",
        engine="actors.hf_backend:HFGenerator",
        label="transformers",
        # transformers runs wherever torch does: the backend 'auto' falls back to.
        runs_here=lambda has_gpu: True,
        rank=1,
        # It always repeats its samples; with traces, --reproducible runs each trace in a batch of its own
        # (HFGenerator.trace_batch).
        reads_for_traces=frozenset({"reproducible"}),
        seeds_batches=True,
    )
)
