"""Keep (what a run keeps, checked once when built), TapCall built from it, and the old names that
stay one release: each warns with DeprecationWarning and gives what the new name gives."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.errors import EditError, InputError, MemoryBudgetError, TapError
from minigpt.taps import Keep, TapCall, Taps

CFG = GPTConfig(vocab_size=50, n_positions=12, n_embd=8, n_layer=2, n_head=2)
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=0)


def test_keep_is_frozen_and_holds_a_tuple_of_names() -> None:
    keep = Keep(["embed", "logits"], keep_positions=[-1], store_dtype=torch.float16, device="cpu")
    assert keep.names == ("embed", "logits") and keep.grad is False and keep.stop_at is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        keep.grad = True


@pytest.mark.parametrize("fields, error, message", [
    (dict(grad=1), InputError, "grad must be True or False, got 1"),
    (dict(device="gpu0"), InputError, "to='gpu0' is not a device"),
    (dict(store_dtype=torch.int64), InputError, "store_dtype=torch.int64 is not a floating dtype"),
    (dict(keep_positions=3), InputError, r"keep_positions must be a slice or a list of ints \(e.g. \[-1\]"),
    (dict(keep_positions=[0, 1.5]), InputError, "keep_positions must be a slice or a list of ints"),
    (dict(keep_positions="first"), InputError, "or 'last'"),
    (dict(grad=True, keep_positions="last", device="cpu"), InputError,
     "grad=True with keep_positions='last', to='cpu': these keep a copy"),
    (dict(names=["embed", 3]), TapError, "tap names are strings, got 3"),
    (dict(stop_at=5), TapError, "tap names are strings, got 5"),
])
def test_keep_refuses_bad_fields_when_built(fields, error, message) -> None:
    with pytest.raises(error, match=message):
        Keep(**fields)


def test_keep_checks_its_positions_against_the_length() -> None:
    Keep(keep_positions=[-6, 5]).check_fits(6)
    Keep(keep_positions="last").check_fits(1)
    with pytest.raises(InputError, match=r"keep_positions \[6\] do not exist in a 6-token input; .*\[-6, 6\)"):
        Keep(keep_positions=[0, 6]).check_fits(6)
    with pytest.raises(InputError, match="keeps no position of a 6-token input"):
        Keep(keep_positions=slice(8, None)).check_fits(6)
    with pytest.raises(InputError, match="is not a usable slice"):
        Keep(keep_positions=slice(0, None, 0)).check_fits(6)


def test_last_is_each_rows_last_real_token() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert Keep(keep_positions="last").position_index(None) == [-1]
    assert Keep(keep_positions="last").position_index(mask).tolist() == [1, 2]
    assert Keep(keep_positions=slice(1, None)).position_index(mask) == slice(1, None)


def test_tapcall_from_a_keep_or_from_names() -> None:
    keep = Keep(("embed",), stop_at="blocks.0.resid_pre")
    call = TapCall(keep)
    assert call.keep is keep and list(call.to_record) == ["embed"] and call.stop_at == "blocks.0.resid_pre"
    by_names = TapCall(["embed"], stop_at="blocks.0.resid_pre")
    assert by_names.keep == keep and by_names.wanted == call.wanted
    with pytest.raises(TypeError, match="not both"):
        TapCall(keep, grad=True)


def test_tapcall_build_checks_edits_and_length(model) -> None:
    keep = Keep(("blocks.0.resid_post",), keep_positions=[7], stop_at="blocks.0.resid_post")
    with pytest.raises(EditError, match=r"edits at \['blocks.1.mlp_delta'\] come after stop_at"):
        TapCall.build(model.tap_names, keep, {"blocks.1.mlp_delta": lambda x: x}, seq=6)
    with pytest.raises(InputError, match=r"keep_positions \[7\] do not exist"):
        TapCall.build(model.tap_names, keep, seq=6)
    call = TapCall.build(model.tap_names, keep, {"embed": lambda x: x}, seq=8)
    assert list(call.edits) == ["embed"] and call.positions == [7]


def test_the_memory_guard_reads_the_keep(model) -> None:
    """check_budget sizes the trace by the Keep: store_dtype halves it, keep_positions shrinks it."""
    whole = model.estimate_trace_bytes("blocks.*.resid_post", 2, 6)
    model.trace_budget_bytes = whole - 1
    try:
        with pytest.raises(MemoryBudgetError, match="recording 2 taps for 2x6 tokens"):
            model.run(TOKENS, taps="blocks.*.resid_post")
        model.run(TOKENS, taps="blocks.*.resid_post", store_dtype=torch.float16)
        model.run(TOKENS, taps="blocks.*.resid_post", keep_positions="last")
    finally:
        model.trace_budget_bytes = "auto"


# ---------------------------------------------------------------------------------------------
# The old names


def test_taps_is_tapcall_and_record_is_to_record() -> None:
    assert Taps is TapCall
    call = TapCall(["embed", "logits"])
    with pytest.warns(DeprecationWarning, match="TapCall.record is renamed TapCall.to_record"):
        assert call.record is call.to_record


@pytest.mark.parametrize("old, new", [
    (dict(dtype=torch.float16), dict(store_dtype=torch.float16)),
    (dict(positions="last"), dict(keep_positions="last")),
    (dict(positions=slice(1, 3), dtype=torch.float64), dict(keep_positions=slice(1, 3), store_dtype=torch.float64)),
])
def test_runs_old_keywords_warn_and_keep_the_same(model, old, new) -> None:
    taps = ["blocks.0.attn.q", "logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keywords do not warn
        logits, trace = model.run(TOKENS, taps=taps, **new)
    with pytest.warns(DeprecationWarning, match="is renamed") as caught:
        old_logits, old_trace = model.run(TOKENS, taps=taps, **old)
    assert len(caught) == len(old) and all(w.filename == __file__ for w in caught)  # pointing at the caller
    assert torch.equal(logits, old_logits) and list(trace) == list(old_trace)
    for name in trace:
        assert trace[name].dtype == old_trace[name].dtype and torch.equal(trace[name], old_trace[name])


@pytest.mark.parametrize("both", [dict(dtype=torch.float16, store_dtype=torch.float16),
                                  dict(positions=[0], keep_positions=[0])])
def test_runs_old_and_new_keyword_together_is_refused(model, both) -> None:
    old = next(k for k in both if k in ("dtype", "positions"))
    with pytest.raises(InputError, match=f"{old}= and .* are the same option"):
        model.run(TOKENS, taps="embed", **both)


def test_source_is_provenance(model) -> None:
    fresh = GPT(CFG)
    assert fresh.provenance == "untrained (initialised) weights"
    with pytest.warns(DeprecationWarning, match="model.source is renamed model.provenance") as caught:
        assert fresh.source == fresh.provenance
        fresh.source = "weights from somewhere"
    assert fresh.provenance == "weights from somewhere" and "source" not in fresh.__dict__
    assert all(w.filename == __file__ for w in caught)


def test_apply_ln_f_is_ln_f_frozen(model) -> None:
    _, trace = model.run(TOKENS, taps=["ln_f.scale", "blocks.1.resid_post"])
    stack = trace["blocks.1.resid_post"]
    with pytest.warns(DeprecationWarning, match="apply_ln_f is renamed Trace.ln_f_frozen"):
        old = trace.apply_ln_f(stack, model, bias=True)
    assert torch.equal(old, trace.ln_f_frozen(stack, model, bias=True))
