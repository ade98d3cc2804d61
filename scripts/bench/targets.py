"""Every target the benchmarks check, stated once, as data.

A concern reports its measured values under the targets' keys (``section["target_values"]``);
``check`` turns them into the targets table. A target whose value was not measured (a row left
out, a GPU-only target on CPU) is not listed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

_HOLDS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    key: str     # "concern.what": the name the concern reports the measured value under
    text: str    # the row of the targets table
    holds_if: str  # "<=", "<", ">=" or ">": how the value must compare with the limit
    limit: float


TARGETS = [
    Target("forward.plain_vs_hf", "minigpt plain no slower than HF plain (faster of eager/sdpa)", "<=", 1.0),
    Target("forward.resid4_over_plain", "4 residual taps of every block: time over minigpt plain", "<=", 1.03),
    Target("forward.all_over_plain", "every tap: time over minigpt plain", "<=", 1.15),
    Target("forward.all_over_plain_beyond_fresh_pages",
           "every tap, less the measured cost of fresh pages for the bytes it returns: time over minigpt plain",
           "<=", 1.15),
    Target("forward.all_vs_tl", "every tap vs TransformerLens full cache (time ratio, lower is better)", "<", 1.0),
    Target("forward.all_but_heads_vs_tl",
           "the same set as TL's full cache (all but attn.heads) vs TL full cache (time ratio)", "<", 1.0),
    Target("forward.resid4_memory", "minigpt_resid4: extra peak memory over minigpt plain / bytes recorded", "<=", 1.15),
    Target("forward.all_memory", "minigpt_all: extra peak memory over minigpt plain / bytes recorded", "<=", 1.15),
    Target("forward.gpu_compiled_resid4_speedup",
           "GPU: compiled 4-residual recording vs HF eager output_hidden_states (speed-up)", ">=", 2.5),
    Target("load.float32.peak_over_weights", "load fp32 + one forward: peak memory over the interpreter's / weight bytes",
           "<=", 1.1),
    Target("load.float32.time_vs_hf", "load fp32 + one forward: time over HF from_pretrained's", "<=", 1.0),
    Target("load.bfloat16.peak_over_weights",
           "load as bf16 + one forward: peak memory over the interpreter's / weight bytes (bf16)", "<=", 1.1),
    Target("load.bfloat16.time_vs_hf", "load as bf16 + one forward: time over HF from_pretrained's", "<=", 1.0),
    Target("harvest.vs_plain", "harvest 4 residual taps to disk, bf16: tokens/s over the plain forward's", ">=", 0.9),
    Target("harvest.vs_hf_hooks", "harvest vs a hand-written HF + hooks harvester writing the same rows (speed-up)",
           ">", 1.0),
    Target("train.step_vs_hf", "training step (forward, backward, AdamW): minigpt time over the faster HF's", "<=", 1.0),
    Target("patching.sweep_vs_hf", "path patching swept over sender heads: minigpt time over the faster HF + hooks "
           "sweep's", "<=", 1.0),
    Target("sae.step_vs_saelens", "SAE training step on harvested bf16 rows: minigpt time over SAELens's", "<=", 1.0),
    Target("sae.topk_step_vs_saelens", "SAE training step on harvested bf16 rows, top-k: minigpt time over SAELens's",
           "<=", 1.0),
    Target("decode.batch1_vs_hf", "decode, batch 1: minigpt time per token over HF generate's", "<=", 1.0),
    Target("decode.compiled_batch1_vs_eager", "decode, batch 1: compile=True time per token over plain minigpt's",
           "<=", 1.0),
    Target("decode.compiled_batch1_x_floor", "decode, batch 1, compile=True: time per token / memory floor", "<=", 1.3),
]


def check(values: dict[str, float]) -> list[dict]:
    """The targets table: every target with a measured value, the value, its limit and whether it holds."""
    return [{"target": t.text, "key": t.key, "value": values[t.key], "limit": t.limit, "holds_if": t.holds_if,
             "holds": bool(_HOLDS[t.holds_if](values[t.key], t.limit))}
            for t in TARGETS if values.get(t.key) is not None]
