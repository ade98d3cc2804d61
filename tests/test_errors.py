"""Hostile input and failure: one clear error for every bad input, and nothing left changed.

Every bad input below must raise a MiniGPTError subclass whose message names what was wrong
and the way out. After every failure the model must be exactly as before: weights bit for bit,
no gradient, no hook, no edit or recording left anywhere, and the next clean run must give
bitwise the clean logits (``assert_untouched``).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minigpt
from minigpt import (GPT, CheckpointError, EditError, GPTConfig, HubError, HubUnreachableError, InputError,
                     MemoryBudgetError, MiniGPTError, MiniGPTWarning, TapError, TokenizerError, edits)
from minigpt.memory import nbytes_estimate
from minigpt.taps import NO_TAPS

CFG = GPTConfig(vocab_size=50, n_positions=12, n_embd=8, n_layer=2, n_head=2, n_inner=32)
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=1)


@pytest.fixture(scope="module")
def clean(model: GPT) -> dict:
    """What the model is before any test touches it: weights and clean logits."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": model(TOKENS).clone()}


def assert_untouched(model: GPT, clean: dict) -> None:
    """The guarantee: weights bit for bit, no grad, no hook, nothing attached, clean run is clean."""
    state = model.state_dict()
    assert state.keys() == clean["state"].keys()
    for name, value in state.items():
        assert torch.equal(value, clean["state"][name]), f"weight {name} changed"
    assert all(p.grad is None for p in model.parameters()), "a failed run left gradients"
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks), \
            "a hook stayed attached"
    assert not NO_TAPS.to_record and not NO_TAPS.edits and not NO_TAPS.trace, "the shared empty TapCall was changed"
    assert not model.training and torch.is_grad_enabled()
    logits, trace = model.run(TOKENS)
    assert len(trace) == 0
    assert torch.equal(logits, clean["logits"]) and torch.equal(model(TOKENS), clean["logits"])


def raises(kind: type[Exception], *fragments: str):
    """pytest.raises that also checks the message holds every fragment."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(kind)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in message: {message}"
            assert isinstance(self.info.value, MiniGPTError) or kind not in MINIGPT_ERRORS
            return handled
    return Check()


MINIGPT_ERRORS = (MiniGPTError, TapError, EditError, InputError, CheckpointError, HubError, HubUnreachableError,
                  TokenizerError, MemoryBudgetError)


def test_every_error_derives_from_the_base_and_a_builtin():
    for kind in MINIGPT_ERRORS[1:]:
        assert issubclass(kind, MiniGPTError)
    assert issubclass(TapError, KeyError) and issubclass(EditError, ValueError)
    assert issubclass(InputError, ValueError) and issubclass(CheckpointError, ValueError)
    assert issubclass(HubUnreachableError, HubError) and issubclass(HubError, OSError)
    assert issubclass(MemoryBudgetError, MemoryError) and issubclass(MiniGPTWarning, UserWarning)
    assert str(TapError("plain message")) == "plain message"  # not KeyError's quoted repr


# ---------------------------------------------------------------------------------------------
# Bad tokens

BAD_TOKENS = {
    "id == vocab": ([[1, 50]], ["token id 50", "[0, 50)", "[0, 1]", "another tokenizer"]),
    "huge id": (torch.tensor([[7, 10**9]]), ["token id 1000000000", "outside the vocabulary"]),
    "negative id": ([2, -1, 3], ["token id -1", "outside the vocabulary"]),
    "float tensor": (TOKENS.float(), ["must be integers", "float32", "round().long()"]),
    "float list": ([1.0, 2.0], ["must be integers"]),
    "bool tensor": (torch.tensor([[True, False]]), ["must be integers", "torch.bool"]),
    "complex tensor": (torch.tensor([1j]), ["must be integers", "complex"]),
    "3-D tensor": (TOKENS.view(1, 1, -1), ["[batch, seq]", "(1, 1, 8)"]),
    "scalar": (torch.tensor(3), ["[batch, seq]", "shape ()"]),
    "texts mixed with ids": (["a b", [1, 2]], ["cannot make a token tensor", "list of texts"]),
    "None": (None, ["cannot make a token tensor from NoneType"]),
    "int too big for int64": ([2**70], ["cannot make a token tensor"]),
    "meta tensor": (torch.tensor([[1, 2]], device="meta"), ["meta device", "real ids"]),
    "sparse tensor": (TOKENS.to_sparse(), ["dense tensor", "to_dense"]),
    "empty string": ("", ["empty text"]),
    "empty list": ([], ["empty input"]),
    "empty batch": ([[]], ["empty input"]),
    "zero-length tensor": (torch.zeros(0, dtype=torch.long), ["empty input", "(1, 0)"]),
    "zero-batch tensor": (torch.zeros(0, 3, dtype=torch.long), ["empty input", "(0, 3)"]),
    "longer than the context": (list(range(13)), ["13 tokens", "context of 12", "keep the last 12"]),
    "text beyond a small vocabulary": ("hello world", ["GPT-2 token id", "only 50 entries"]),
}


@pytest.mark.parametrize("case", BAD_TOKENS, ids=list(BAD_TOKENS))
def test_bad_tokens_are_refused_and_nothing_changes(model, clean, case):
    inputs, fragments = BAD_TOKENS[case]
    with raises(InputError, *fragments):
        model.run(inputs, taps="*", edits={"blocks.0.resid_post": lambda x: x * 2})
    assert_untouched(model, clean)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_every_integer_dtype_is_accepted_by_run(model, clean, dtype):
    logits, _ = model.run(TOKENS.to(dtype))
    assert torch.equal(logits, clean["logits"])


def test_forward_refuses_what_embedding_cannot_index(model, clean):
    assert torch.equal(model(TOKENS.int()), clean["logits"])
    with raises(InputError, "int64 (or int32)", "uint8", ".long()"):
        model(TOKENS.to(torch.uint8))
    with raises(InputError, "must be a tensor", "model.run"):
        model([[1, 2]])
    assert_untouched(model, clean)


# ---------------------------------------------------------------------------------------------
# Bad taps, bad edits

def _raise_value_error(x):
    raise ValueError("my own edit broke")


BAD_RUNS = {
    "unknown tap": (dict(taps="blocks.0.resid_pots"), TapError, ["'blocks.0.resid_pots'", "did you mean",
                                                                 "'blocks.0.resid_post'", "model.tap_names"]),
    "unknown model-level tap": (dict(taps=["embed", "logit"]), TapError, ["'logit'", "'logits'"]),
    "tap given as an int": (dict(taps=7), TapError, ["tap name, a glob pattern or a list"]),
    "tap list holding an int": (dict(taps=["embed", 3]), TapError, ["strings, got int 3"]),
    "pattern matching nothing": (dict(taps="blocks.*.attn.patern"), TapError, ["matches no tap",
                                                                               "blocks.0.attn.pattern"]),
    "block out of range": (dict(taps="blocks.99.resid_post"), TapError, ["block 99 does not exist", "blocks 0..1"]),
    "block out of range in a pattern": (dict(taps="blocks.2.*"), TapError, ["block 2 does not exist"]),
    "edit on an unknown tap": (dict(edits={"blocks.0.mlp.psot": lambda x: x}), TapError,
                               ["'blocks.0.mlp.psot'", "'blocks.0.mlp.post'"]),
    "edit on a missing block": (dict(edits={"blocks.5.resid_post": lambda x: x}), TapError, ["block 5 does not exist"]),
    "built-in edit, missing block": (dict(edits=edits.zero_head_keys(99, 0)), TapError, ["block 99 does not exist"]),
    "built-in edit, missing head": (dict(edits=edits.zero_head_keys(1, 2)), EditError,
                                    ["head 2 does not exist", "heads 0..1"]),
    "built-in noise, missing block": (dict(edits=edits.noise_neurons(7)), TapError, ["block 7 does not exist"]),
    "built-in noise, missing neuron": (dict(edits=edits.noise_neurons(0, [0, 32])), EditError, ["[0, 32)"]),
    "built-in scale, missing block": (dict(edits=edits.scale_block(2, 0.5)), TapError, ["block 2 does not exist"]),
    "edit of the wrong shape": (dict(edits={"blocks.1.ln2": lambda x: x[..., :-1]}), EditError,
                                ["'blocks.1.ln2'", "(1, 8, 7)", "(1, 8, 8)", "keep the shape"]),
    "edit that broadcasts": (dict(edits={"ln_f": lambda x: x[0]}), EditError, ["(8, 8)", "(1, 8, 8)"]),
    "edit of the wrong dtype": (dict(edits={"blocks.0.attn.q": lambda x: x.double()}), EditError,
                                ["'blocks.0.attn.q'", "torch.float64", "torch.float32", ".to(x)"]),
    "edit on the wrong device": (dict(edits={"blocks.0.mlp.post": lambda x: torch.zeros_like(x, device="meta")}),
                                 EditError, ["'blocks.0.mlp.post'", "meta", "cpu", ".to(x)"]),
    "edit returning a non-tensor": (dict(edits={"blocks.0.attn.pattern": lambda x: x.tolist()}), EditError,
                                    ["returned list, not a tensor"]),
    "edit returning None": (dict(edits={"embed": lambda x: None}), EditError, ["returned NoneType"]),
    "replacement tensor of the wrong shape": (dict(edits={"embed": torch.zeros(8)}), EditError,
                                              ["replacement tensor", "(8,)"]),
    "edit that is not a function": (dict(edits={"embed": 0.0}), EditError, ["is a float", "function"]),
    "edits that are not a dict": (dict(edits=[("embed", lambda x: x)]), EditError, ["must be a dict", "got list"]),
    "two edits on one tap": (dict(edits={"blocks.0.resid_post": lambda x: x, "blocks.*.resid_post": lambda x: x}),
                             EditError, ["edited twice", "'blocks.0.resid_post'", "'blocks.*.resid_post'"]),
    "a later edit fails after others ran": (dict(taps="*", edits={"blocks.0.resid_post": lambda x: x.mul_(3),
                                                                  "logits": lambda x: x[:, :1]}), EditError, ["logits"]),
    "positions out of range": (dict(taps="embed", keep_positions=[0, 8]), InputError, ["keep_positions [8]", "[-8, 8)"]),
    "positions selecting nothing": (dict(taps="embed", keep_positions=slice(20, None)), InputError, ["keeps no position"]),
    "positions as an int": (dict(taps="embed", keep_positions=3), InputError, ["slice or a list of ints", "[-1]"]),
    "trace dtype not floating": (dict(taps="embed", store_dtype=torch.int64), InputError, ["floating dtype"]),
    "trace device unknown": (dict(taps="embed", to="gpu0"), InputError, ["'gpu0' is not a device"]),
    "grad not a bool": (dict(grad="yes"), InputError, ["grad must be True or False"]),
}


@pytest.mark.parametrize("case", BAD_RUNS, ids=list(BAD_RUNS))
def test_bad_taps_and_edits_are_refused_and_nothing_changes(model, clean, case):
    kwargs, kind, fragments = BAD_RUNS[case]
    with raises(kind, *fragments):
        model.run(TOKENS, **kwargs)
    assert_untouched(model, clean)


@pytest.mark.parametrize("grad", [False, True])
def test_an_edit_that_raises_surfaces_its_own_error_naming_the_tap(model, clean, grad):
    with pytest.raises(ValueError, match="my own edit broke") as info:
        model.run(TOKENS, taps="*", grad=grad, edits={"blocks.1.attn.scores": _raise_value_error})
    assert not isinstance(info.value, MiniGPTError)  # the edit's own exception, not a wrapper
    assert any("'blocks.1.attn.scores'" in note for note in info.value.__notes__)
    assert_untouched(model, clean)


def test_an_edit_mutating_activations_in_place_never_reaches_the_weights(model, clean):
    def in_place(x):
        return x.mul_(0.5) if x.stride()[0] else x  # (pos_embed is an expanded view: leave it)

    mutated, _ = model.run(TOKENS, edits={name: in_place for name in model.tap_names})
    assert not torch.equal(mutated, clean["logits"])
    assert_untouched(model, clean)


def test_trace_lookups_name_the_missing_tap(model):
    _, trace = model.run(TOKENS, taps="blocks.*.resid_post")
    with raises(TapError, "'blocks.1.resid_pre' was not recorded", "'blocks.1.resid_post'", "taps=["):
        trace["blocks.1.resid_pre"]
    with raises(TapError, "hidden_states() needs taps", "blocks.*.resid_pre"):
        trace.hidden_states()


# ---------------------------------------------------------------------------------------------
# NaN and inf from edits: a MiniGPTWarning (documented), never an error, and -inf is fine in scores


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_edit_producing_nan_or_inf_warns_naming_the_tap(model, clean, value):
    with pytest.warns(MiniGPTWarning, match="'blocks.0.mlp_delta' produced"):
        logits, _ = model.run(TOKENS, edits={"blocks.0.mlp_delta": lambda x: x.index_fill(1, torch.tensor([2]), value)})
    assert not torch.isfinite(logits).all()
    assert_untouched(model, clean)


def test_minus_inf_is_allowed_in_attention_scores(model):
    def mask_first_key(scores):  # every query but the first still sees itself
        scores = scores.clone()
        scores[:, :, 1:, 0] = float("-inf")
        return scores

    with warnings.catch_warnings():
        warnings.simplefilter("error", MiniGPTWarning)
        logits, trace = model.run(TOKENS, taps="blocks.0.attn.pattern", edits={"blocks.0.attn.scores": mask_first_key})
    assert torch.isfinite(logits).all()
    assert (trace["blocks.0.attn.pattern"][:, :, 1:, 0] == 0).all()


@pytest.mark.parametrize("fill", ["all -inf row", "+inf", "nan"])
def test_scores_that_make_the_softmax_nan_warn(model, clean, fill):
    def edit(scores):
        scores = scores.clone()
        if fill == "all -inf row":
            scores[:, :, 3, :] = float("-inf")
        else:
            scores[:, :, 3, 0] = float(fill.strip("+"))
        return scores

    with pytest.warns(MiniGPTWarning, match="'blocks.1.attn.scores'"):
        model.run(TOKENS, edits={"blocks.1.attn.scores": edit})
    assert_untouched(model, clean)


def test_nan_warning_can_be_made_an_error_and_still_nothing_changes(model, clean):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MiniGPTWarning)
        with pytest.raises(MiniGPTWarning):
            model.run(TOKENS, taps="*", edits={"embed": lambda x: x / 0})
    assert_untouched(model, clean)


# ---------------------------------------------------------------------------------------------
# Memory guard


def _bytes_held(trace) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in trace.items()}


def _bytes_in_memory(trace) -> int:
    """What the trace really keeps alive: each distinct storage once (views keep their whole parent)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in trace.values()}.values())


@pytest.mark.parametrize("seed", range(6))
def test_estimate_equals_the_bytes_recorded(model, seed):
    """For random selections of taps, batch, positions and dtype, tap by tap."""
    g = torch.Generator().manual_seed(seed)
    chosen = [n for n in model.tap_names if torch.rand(1, generator=g) < 0.3] or ["logits"]
    batch, seq = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
    tokens = torch.randint(CFG.vocab_size, (batch, seq), generator=g)
    positions = [None, [-1], slice(0, None, 2), [0, 0]][seed % 4]
    dtype = [None, torch.bfloat16, torch.float64][seed % 3]
    _, trace = model.run(tokens, taps=chosen, keep_positions=positions, store_dtype=dtype)
    itemsize = (dtype or torch.float32).itemsize
    assert _bytes_held(trace) == nbytes_estimate(chosen, batch, seq, CFG, itemsize, positions)
    estimate = model.estimate_trace_bytes(chosen, batch, seq, store_dtype=dtype, keep_positions=positions)
    assert sum(_bytes_held(trace).values()) == estimate
    assert _bytes_in_memory(trace) <= estimate  # no view keeps a bigger parent alive (q of qkv, a slice)


def test_estimate_covers_every_tap(model):
    tokens = torch.randint(CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    _, trace = model.run(tokens, taps="*")
    assert _bytes_held(trace) == nbytes_estimate(model.tap_names, 2, 5, CFG, 4)
    for taps, positions in [("blocks.*.attn.q", None), ("blocks.0.attn.[kv]", None), ("*", slice(-1, None))]:
        _, trace = model.run(tokens, taps=taps, keep_positions=positions)
        assert _bytes_in_memory(trace) <= model.estimate_trace_bytes(taps, 2, 5, keep_positions=positions)


def test_estimate_of_the_taps_that_grow_fast():
    """attn.pattern is batch x heads x seq^2, attn.heads batch x seq x heads x d_model (GPT-2 medium, no weights)."""
    with torch.device("meta"):
        medium = GPT(minigpt.OFFICIAL["gpt2-medium"])
    L, H, D = 24, 16, 1024
    assert medium.estimate_trace_bytes("blocks.*.attn.pattern", 8, 1024) == L * 8 * H * 1024 * 1024 * 4
    assert medium.estimate_trace_bytes("blocks.*.attn.heads", 8, 1024, store_dtype=torch.bfloat16) == L * 8 * 1024 * H * D * 2
    assert medium.estimate_trace_bytes("logits", 1, 1024, keep_positions=[-1]) == 50257 * 4
    with raises(InputError, "seq must be a positive integer"):
        medium.estimate_trace_bytes("logits", 1, 0)


def test_a_run_over_budget_fails_before_it_allocates(model, clean):
    taps = ["blocks.*.attn.pattern", "blocks.*.mlp.post", "embed"]
    need = model.estimate_trace_bytes(taps, 1, 8)
    started = []
    model.trace_budget_bytes = need - 1
    try:
        with raises(MemoryBudgetError, f"would hold {need / 1024:.1f} KiB", "over the budget",
                    "blocks.0.mlp.post", "blocks.1.mlp.post", "trace_budget_bytes") as info:
            model.run(TOKENS, taps=taps, edits={"embed": lambda x: started.append(1) or x})
        assert "'embed'" not in str(info.value) and "embed (" not in str(info.value)  # only the biggest are named
        assert not started, "the forward pass began before the budget was checked"
        model.trace_budget_bytes = need  # exactly the budget: allowed
        model.run(TOKENS, taps=taps)
        model.trace_budget_bytes = "lots"
        with raises(InputError, "trace_budget_bytes must be a number of bytes, 'auto' or None"):
            model.run(TOKENS, taps=taps)
    finally:
        model.trace_budget_bytes = "auto"
    assert_untouched(model, clean)


def test_the_auto_budget_is_half_the_free_memory(model, clean, monkeypatch):
    import minigpt.model

    assert model.trace_budget_bytes == "auto"
    free = minigpt.memory.available_memory(torch.device("cpu"))
    assert free is None or free > 0
    need = model.estimate_trace_bytes("*", 1, 8)
    monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: 2 * need - 2)
    with raises(MemoryBudgetError, "half the", "free on cpu", "trace_budget_bytes='auto'"):
        model.run(TOKENS, taps="*")
    model.run(TOKENS, taps="logits")  # small enough
    model.run(TOKENS)  # nothing recorded: nothing to guard
    assert_untouched(model, clean)


# ---------------------------------------------------------------------------------------------
# Checkpoints

CKPT_CONFIG = dict(vocab_size=40, n_positions=10, n_embd=8, n_layer=2, n_head=2, n_inner=None,
                   layer_norm_epsilon=1e-5, activation_function="gelu_new", scale_attn_by_inverse_layer_idx=False)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    from hf_reference import make_hf, write_checkpoint

    return write_checkpoint(make_hf(CKPT_CONFIG, seed=3, dtype=torch.float32), tmp_path_factory.mktemp("good"))


@pytest.fixture
def ckpt(good_checkpoint, tmp_path) -> Path:
    """A fresh copy of the good checkpoint to spoil."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory: Path, change) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_the_good_checkpoint_loads(ckpt):
    model = GPT.from_pretrained(ckpt)
    assert model.cfg.n_layer == 2 and str(ckpt) in model.provenance


def _drop_add_reshape(t):
    del t["h.1.mlp.c_fc.bias"]
    t["h.0.attn.rotary.weight"] = torch.zeros(3)
    t["h.0.ln_2.weight"] = torch.ones(9)


class Trap:
    """A pickle that, when unpickled, writes a marker file: proof that code in it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


BAD_CHECKPOINTS = {
    "no config.json": (lambda d: (d / "config.json").unlink(), ["has no config.json"]),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), ["has no model.safetensors"]),
    "config not JSON": (lambda d: (d / "config.json").write_text("{model_type: gpt2"), ["cannot read", "as JSON"]),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), ["must hold a JSON object"]),
    "llama config": (lambda d: _edit_config(d, model_type="llama"), ["model_type='llama'", "GPT-2 checkpoints only",
                                                                    "transformers"]),
    "no model_type": (lambda d: _edit_config(d, model_type=None), ["model_type=None"]),
    "unscaled attention": (lambda d: _edit_config(d, scale_attn_weights=False), ["scale_attn_weights=False"]),
    "untied head": (lambda d: _edit_config(d, tie_word_embeddings=False), ["tie_word_embeddings"]),
    "unknown activation": (lambda d: _edit_config(d, activation_function="swish"), ["'swish'", "supported"]),
    "n_head as text": (lambda d: _edit_config(d, n_head="2"), ["n_head must be a positive integer", "'2'"]),
    "n_embd not divisible": (lambda d: _edit_config(d, n_head=3), ["divisible by n_head"]),
    "dropout not a probability": (lambda d: _edit_config(d, attn_pdrop="0.1"), ["attn_pdrop", "probability"]),
    "config says 4 blocks, weights 2": (lambda d: _edit_config(d, n_layer=4),
                                        ["describe different models", "n_layer=4", "h.0..h.1"]),
    "config says a billion blocks": (lambda d: _edit_config(d, n_layer=10**9), ["n_layer=1000000000"]),
    "config and weights differ in width": (lambda d: _edit_config(d, n_embd=16, n_head=2),
                                           ["n_embd=16", "wte.weight is [40, 8]"]),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                          ["not a readable safetensors file", "truncated or corrupt", "download it again"]),
    "corrupted header": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:8] + b"\x00garbage" + (d / "model.safetensors").read_bytes()[16:]),
        ["not a readable safetensors file"]),
    "empty weights file": (lambda d: (d / "model.safetensors").write_bytes(b""), ["not a readable safetensors file"]),
    "missing, extra and mis-shaped tensors at once": (lambda d: _edit_tensors(d, _drop_add_reshape), [
        "missing 1: h.1.mlp.c_fc.bias", "unexpected 1: h.0.attn.rotary.weight",
        "mis-shaped 1: h.0.ln_2.weight: (9,), expected (8,)"]),
    "integer weights": (lambda d: _edit_tensors(d, lambda t: t.update({"h.0.ln_1.bias": t["h.0.ln_1.bias"].long()})),
                        ["not floating point 1", "h.0.ln_1.bias: torch.int64"]),
    "sharded index pointing outside": (lambda d: ((d / "model.safetensors").rename(d / "shard.safetensors"),
                                                  (d / "model.safetensors.index.json").write_text(json.dumps(
                                                      {"weight_map": {"wte.weight": "../../etc/x.safetensors"}}))),
                                       ["lists", "plain .safetensors file names"]),
    "sharded index with a missing shard": (lambda d: ((d / "model.safetensors").unlink(),
                                                      (d / "model.safetensors.index.json").write_text(json.dumps(
                                                          {"weight_map": {"wte.weight": "s-1.safetensors"}}))),
                                           ["s-1.safetensors does not exist", "incomplete"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_with_the_way_out(ckpt, case):
    spoil, fragments = BAD_CHECKPOINTS[case]
    spoil(ckpt)
    with raises(CheckpointError, *fragments):
        GPT.from_pretrained(ckpt)


def test_a_checkpoint_with_nan_weights_warns(ckpt):
    _edit_tensors(ckpt, lambda t: t["h.1.attn.c_proj.weight"].view(-1)[5].fill_(float("nan")))
    with pytest.warns(MiniGPTWarning, match="NaN or inf in 1 tensors .*blocks.1.attn.out.weight"):
        GPT.from_pretrained(ckpt)


def test_not_a_directory_nor_a_name(ckpt):
    with raises(CheckpointError, "is a file", "pass the directory"):
        GPT.from_pretrained(ckpt / "config.json")
    with raises(CheckpointError, "checkpoint directory or a hub name"):
        GPT.from_pretrained(None)


@pytest.mark.parametrize("where", ["pytorch_model.bin", "model.safetensors"])
def test_a_booby_trapped_pickle_is_never_executed(ckpt, tmp_path, where):
    marker = tmp_path / "pwned"
    trap = pickle.dumps({"wte.weight": Trap(marker)})
    # The trap is live: unpickling these bytes runs the code (proven once, on a separate marker).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Trap(live)))
    assert live.exists()
    (ckpt / "model.safetensors").unlink()
    (ckpt / where).write_bytes(trap)
    if where == "pytorch_model.bin":
        expected = ["pytorch_model.bin", "pickle", "arbitrary code", "save_pretrained", "safe_serialization=True"]
    else:
        expected = ["not a readable safetensors file"]
    with raises(CheckpointError, *expected):
        GPT.from_pretrained(ckpt)
    assert not marker.exists(), "minigpt executed code from a pickle"


def test_nothing_is_built_from_a_failed_load_and_other_models_are_untouched(model, clean, ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("wpe.weight"))
    with raises(CheckpointError, "missing 1: wpe.weight"):
        GPT.from_pretrained(ckpt)
    assert_untouched(model, clean)


# ---------------------------------------------------------------------------------------------
# Hub and tokenizer, offline


def test_an_unreachable_hub_with_nothing_cached_says_offline_and_how_to_load_locally(tmp_path):
    """In a fresh process, as a user would meet it: HF_HUB_OFFLINE=1 and an empty cache."""
    code = ("import minigpt\n"
            "try:\n    minigpt.GPT.from_pretrained('gpt2')\n"
            "except minigpt.MiniGPTError as e:\n    print(type(e).__name__); print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    kind, message = out.stdout.split("\n", 1)
    assert kind == "HubUnreachableError"
    for fragment in ("'gpt2'", "unreachable", "offline", "HF_HUB_OFFLINE", "not in the local cache", "DIR"):
        assert fragment in message, message


def test_a_hub_name_that_does_not_exist(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def fake_download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub answers 404
        Exception.__init__(error, f"404 Client Error: Repository Not Found for url: .../{repo_id}")
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(minigpt.weights.hub, "_resolves", lambda url: True)  # as on a connected machine
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with raises(HubError, "no model 'nobody/gpt2-nope' on the hub", "check the name", "local directory"):
        GPT.from_pretrained("nobody/gpt2-nope")


def test_a_malformed_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises(HubError, "neither a local directory nor a valid hub name"):
        GPT.from_pretrained("no such/dir//at all")


@pytest.fixture
def no_tokenizer_cache(monkeypatch):
    """gpt2_tokenizer's lru_cache emptied (and emptied again afterwards, so later tests reload the real one)."""
    import tiktoken.registry

    from minigpt.tokenizer import gpt2_tokenizer

    gpt2_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken's own in-process cache
    yield
    gpt2_tokenizer.cache_clear()


def test_a_missing_tokenizer_vocabulary_offline_says_how_to_provide_it(monkeypatch, tmp_path, no_tokenizer_cache):
    import tiktoken.load

    def offline(blobpath):
        raise ConnectionError(f"network is unreachable (test): {blobpath}")

    monkeypatch.setenv("MINIGPT_TOKENIZER_FILE", str(tmp_path / "missing" / "gpt2.tiktoken"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)  # no network, even where CI has one
    model = GPT.random(GPTConfig(n_embd=8, n_layer=1, n_head=1, n_positions=8))
    with raises(TokenizerError, "not available offline", "minigpt setup", "MINIGPT_TOKENIZER_FILE",
                "token ids"):
        model.run("hello")
    model.run([31373])  # ids need no vocabulary


@pytest.mark.parametrize("content", ["garbage", "directory"])
def test_a_corrupt_tokenizer_vocabulary(monkeypatch, tmp_path, no_tokenizer_cache, content):
    path = tmp_path / "gpt2.tiktoken"
    if content == "directory":
        path.mkdir()
    else:
        path.write_text("not a vocabulary\n")
    monkeypatch.setenv("MINIGPT_TOKENIZER_FILE", str(path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with raises(TokenizerError, "is not GPT-2's vocabulary", "minigpt setup"):
        minigpt.tokenizer.gpt2_tokenizer()


def test_no_network_fails_at_once_without_the_hub_clients_retries(monkeypatch, tmp_path):
    """Where the hub's host does not resolve, loading by name says offline without trying to download."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def no_download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with raises(HubUnreachableError, "unreachable", "minigpt download"):
        GPT.from_pretrained("gpt2")
    assert calls == [True]  # only the cache was asked
