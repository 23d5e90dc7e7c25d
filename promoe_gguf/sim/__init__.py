"""`promoe simulate`: an event-level model of decode and prefill for our runtime (the real cache,
placement and prefetch logic on a virtual clock) and for stock llama.cpp's offload modes.

    from promoe_gguf.sim import simulate
    r = simulate(shape="qwen3-30b-a3b", profile="rtx4070ti-12g", engine="promoe", policy="promoe",
                 predictor="gate", cpu_experts="auto")
    r["decode_tok_s"], r["prefill_tok_s"]

MODEL.md (beside this file) documents every term, constant and source; bench/results/sim/ holds the
validation against measured and published runs. Simulated numbers are predictions, never measurements.
"""
from __future__ import annotations

from .run import Inputs, load_inputs, simulate, sweep

__all__ = ["simulate", "sweep", "load_inputs", "Inputs"]
