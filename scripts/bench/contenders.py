"""The set-ups: random-weight checkpoints, the models loaded from them, and the forward contenders.

Every library is loaded from the same checkpoint directory, so that all run the same weights.
A forward contender is a ``Contender`` whose ``make(models)`` gives a ``Call``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from importlib.util import find_spec
from pathlib import Path

import torch

from minigpt import GPT, GPTConfig
from minigpt.weights import to_hf_state_dict

# The tiny model of --quick runs.
QUICK_CONFIG = GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
FOUR = ["blocks.*.resid_pre", "blocks.*.attn_delta", "blocks.*.mlp_delta", "blocks.*.resid_post"]
TL_FOUR = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")

# A call takes the tokens [B, S] and returns (logits [B, S, V], the tensors it recorded).
Call = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def write_checkpoint(directory: Path, cfg: GPTConfig, seed: int = 0) -> Path:
    """A random-weight GPT-2 in the official HF layout (config.json + model.safetensors, no prefix).

    Written once: an existing one is reused.
    """
    from safetensors.torch import save_file

    if not (directory / "model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        model = GPT.random(cfg, seed=seed)
        save_file(to_hf_state_dict(model.state_dict(), cfg.n_layer, official=True), str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1), encoding="utf-8")
    return directory


def bench_checkpoint(out: Path, quick: bool) -> tuple[Path, GPTConfig]:
    """The checkpoint the forward and decode rows share: GPT-2 small's shape, or the tiny one."""
    cfg = QUICK_CONFIG if quick else GPTConfig()
    return write_checkpoint(out / ("checkpoint-quick" if quick else "checkpoint-gpt2-small"), cfg), cfg


def hf_twin(model: GPT):
    """HuggingFace's GPT2LMHeadModel (default attention, SDPA) with the same weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    weight = model.embed.weight
    last = model.cfg.vocab_size - 1  # GPT-2's end token, or the last id of a smaller test vocabulary
    config = GPT2Config(**model.cfg.to_hf(), bos_token_id=last, eos_token_id=last)
    hf = GPT2LMHeadModel(config).to(dtype=weight.dtype, device=weight.device).eval()
    state = to_hf_state_dict(model.state_dict(), model.cfg.n_layer, official=False)
    hf.load_state_dict(state | {"lm_head.weight": state["transformer.wte.weight"]})
    return hf


def tl_available() -> bool:
    return find_spec("transformer_lens") is not None


# ---------------------------------------------------------------------------------------------
# The models, each loaded at most once per process, all from the same checkpoint directory


class Models:
    def __init__(self, checkpoint: Path, device: str, dtype: torch.dtype):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self._hf: dict[str, torch.nn.Module] = {}

    @cached_property
    def minigpt(self) -> GPT:
        return GPT.from_pretrained(self.checkpoint, dtype=self.dtype, device=self.device)

    @cached_property
    def minigpt_compiled(self) -> GPT:
        # A second instance: compiling changes how the module is called, and the eager rows must stay eager.
        model = GPT.from_pretrained(self.checkpoint, dtype=self.dtype, device=self.device)
        model.compile(fullgraph=True)
        return model

    def hf(self, attention: str):
        """HF GPT2LMHeadModel with ``attention`` ("eager", "sdpa", or either + "+compile"), loaded once."""
        if attention not in self._hf:
            self._hf[attention] = self._load_hf(attention)
        return self._hf[attention]

    def _load_hf(self, attention: str):
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        compiled = attention.endswith("+compile")
        model = GPT2LMHeadModel.from_pretrained(self.checkpoint, attn_implementation=attention.removesuffix("+compile"),
                                                dtype=self.dtype).to(self.device).eval()
        return torch.compile(model) if compiled else model  # not fullgraph: HF's graph is not ours to fix

    @cached_property
    def tl(self):
        """TransformerLens HookedTransformer with the same weights, no weight processing at all."""
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        hf = self._load_hf("eager")  # a private copy: TL's loader only reads it
        c = hf.config
        # Built by hand: from_pretrained* only accepts names from TL's list of official models,
        # and this checkpoint is a local random-weight one.
        cfg = HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
            act_fn=c.activation_function, normalization_type="LN", original_architecture="GPT2LMHeadModel",
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, default_prepend_bos=False,
            dtype=self.dtype, device=self.device)
        model = HookedTransformer(cfg, move_to_device=True)
        # The same switches as from_pretrained_no_processing: no folding, no centring.
        model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False,
                                          refactor_factored_attn_matrices=False)
        return model.eval()


# ---------------------------------------------------------------------------------------------
# The forward contenders


@dataclass(frozen=True)
class Contender:
    name: str       # key in the JSON
    label: str      # row in the table
    library: str    # "minigpt", "hf_eager", "hf_sdpa" or "tl": whose plain row its memory is compared with
    make: Callable[[Models], Call]
    kind: str = "record"  # "plain" (nothing recorded) or "record"


def minigpt_plain(compiled: bool = False) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.minigpt_compiled if compiled else models.minigpt
        return lambda tokens: (model(tokens), [])
    return make


def minigpt_taps(taps, compiled: bool = False, **options) -> Callable[[Models], Call]:
    """``taps``: names or patterns, or a function of the model that lists them."""
    def make(models: Models) -> Call:
        model = models.minigpt_compiled if compiled else models.minigpt
        names = taps(model) if callable(taps) else taps

        def call(tokens):
            logits, trace = model.run(tokens, taps=names, **options)
            return logits, list(trace.values())
        return call
    return make


def hf_plain(attention: str) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.hf(attention)
        return lambda tokens: (model(input_ids=tokens, use_cache=False).logits, [])
    return make


def hf_hidden_and_hooks(attention: str) -> Callable[[Models], Call]:
    """The notes' way (docs/NOTES.md, section 1): output_hidden_states, plus forward hooks on both c_proj of
    every block."""
    def make(models: Models) -> Call:
        model = models.hf(attention)
        projections = [m for block in model.transformer.h for m in (block.attn.c_proj, block.mlp.c_proj)]

        def call(tokens):
            kept: list[torch.Tensor] = []
            handles = [p.register_forward_hook(lambda mod, args, out: kept.append(out.detach())) for p in projections]
            try:
                out = model(input_ids=tokens, use_cache=False, output_hidden_states=True)
            finally:
                for h in handles:
                    h.remove()
            return out.logits, [*out.hidden_states, *kept]
        return call
    return make


def tl_cache(four_only: bool) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.tl
        names_filter = (lambda name: name.endswith(TL_FOUR)) if four_only else None

        def call(tokens):
            logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
            return logits, list(cache.values())
        return call
    return make


def forward_contenders(device: str, compile: bool, skip_tl: bool) -> list[Contender]:
    """Every row of the forward table, in its order."""
    rows = [
        Contender("minigpt_plain", "minigpt plain", "minigpt", minigpt_plain(), "plain"),
        Contender("minigpt_resid4", "minigpt, 4 residual taps x every block", "minigpt", minigpt_taps(FOUR)),
        Contender("minigpt_all", "minigpt, every tap (\"*\")", "minigpt", minigpt_taps("*")),
        # TransformerLens's cache has no per-head outputs unless use_attn_result=True (off by default):
        # this row records what its full cache holds, for a like-for-like comparison.
        Contender("minigpt_all_but_heads", "minigpt, every tap but attn.heads (TL's full cache's set)", "minigpt",
                  minigpt_taps(lambda model: [n for n in model.tap_names if not n.endswith("attn.heads")])),
        # The memory-saving options of a run: a lower storage dtype, and only some positions.
        Contender("minigpt_all_bf16", "minigpt, every tap, kept in bf16 (store_dtype=)", "minigpt",
                  minigpt_taps("*", store_dtype=torch.bfloat16)),
        Contender("minigpt_resid4_last", "minigpt, 4 residual taps, last position (keep_positions=)", "minigpt",
                  minigpt_taps(FOUR, keep_positions=slice(-1, None))),
    ]
    if device.startswith("cuda"):
        rows.append(Contender("minigpt_resid4_to_cpu", "minigpt, 4 residual taps, kept on CPU (to=)", "minigpt",
                              minigpt_taps(FOUR, to="cpu")))
    rows += [
        Contender("hf_eager_plain", "HF plain, eager attention", "hf_eager", hf_plain("eager"), "plain"),
        Contender("hf_sdpa_plain", "HF plain, sdpa attention (transformers 5 default)", "hf_sdpa",
                  hf_plain("sdpa"), "plain"),
        Contender("hf_eager_hidden_hooks", "HF eager, output_hidden_states + c_proj hooks", "hf_eager",
                  hf_hidden_and_hooks("eager")),
        Contender("hf_sdpa_hidden_hooks", "HF sdpa, output_hidden_states + c_proj hooks", "hf_sdpa",
                  hf_hidden_and_hooks("sdpa")),
    ]
    if not skip_tl:
        rows += [
            Contender("tl_cache_all", "TransformerLens run_with_cache, every hook", "tl", tl_cache(False)),
            Contender("tl_cache_resid4", "TransformerLens run_with_cache, 4 residual hooks", "tl", tl_cache(True)),
        ]
    if compile:
        rows += [
            Contender("minigpt_plain_compiled", "minigpt plain, torch.compile", "minigpt", minigpt_plain(True), "plain"),
            Contender("minigpt_resid4_compiled", "minigpt, 4 residual taps, torch.compile", "minigpt",
                      minigpt_taps(FOUR, compiled=True)),
            Contender("hf_sdpa_plain_compiled", "HF plain sdpa, torch.compile", "hf_sdpa",
                      hf_plain("sdpa+compile"), "plain"),
        ]
    return rows
