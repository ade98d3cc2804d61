"""Hostile calls: a run never writes a tensor the caller
owns, the memory guard covers the whole call, every argument is checked, and generation never
changes a model's mode.
"""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, InputError, MemoryBudgetError, edits

CFG = GPTConfig(vocab_size=50, n_positions=12, n_embd=8, n_layer=2, n_head=2)
MODEL = GPT.random(CFG, seed=4)
TOKENS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


# ---------------------------------------------------------------------------------------------
# Item 5: nothing the caller owns is written


def in_place(kind: str):
    """An edit that changes its input in place, in one of several ways."""
    return {"mul": lambda x: x.mul_(2.0), "zero": lambda x: x.zero_(), "fill": lambda x: x.fill_(0.5),
            "index": lambda x: x.index_fill_(-1, torch.tensor([0]), 3.0)}[kind]


@given(recorded=st.lists(st.sampled_from(MODEL.tap_names), max_size=6),
       edited=st.lists(st.tuples(st.sampled_from(MODEL.tap_names), st.sampled_from(["mul", "zero", "fill", "index",
                                                                                      "replace"])), max_size=4),
       chained=st.booleans(), as_tensor=st.booleans(), grad=st.booleans())
def test_a_run_never_writes_a_tensor_the_caller_owns(recorded, edited, chained, as_tensor, grad) -> None:
    _, earlier = MODEL.run(TOKENS, taps="*")  # tensors from an earlier trace, owned by the caller now
    owned = {name: earlier[name] for name in MODEL.tap_names}
    tokens = TOKENS.clone()
    plan = {}
    for name, kind in edited:
        # A replacement is the earlier trace's own tensor (or a tensor of the caller's for the same tap).
        plan[name] = owned[name] if kind == "replace" else in_place(kind)
    if chained:  # the same tensor object passes two taps: replaced at one, changed in place at the next
        plan |= {"blocks.0.resid_post": owned["blocks.0.resid_post"], "blocks.1.resid_pre": in_place("mul")}
    snapshot = {name: t.clone() for name, t in owned.items()}
    inputs = tokens if as_tensor else tokens.tolist()
    MODEL.run(inputs, taps=recorded, edits=plan, grad=grad)
    for name, before in snapshot.items():
        assert torch.equal(owned[name], before), f"the run wrote into the caller's {name}"
    assert torch.equal(tokens, TOKENS)


def test_a_replacement_then_an_in_place_edit_downstream_leaves_the_replacement_alone() -> None:
    mine = torch.ones(2, 5, CFG.n_embd)
    keep = mine.clone()
    # resid_post of block 0 is the same tensor that block 1 receives as resid_pre.
    MODEL.run(TOKENS, taps=["blocks.1.resid_pre"], edits={"blocks.0.resid_post": mine,
                                                          "blocks.1.resid_pre": lambda x: x.mul_(5.0)})
    assert torch.equal(mine, keep)


# ---------------------------------------------------------------------------------------------
# Item 6: the guard covers the whole call


def test_the_guard_counts_the_forward_itself(monkeypatch) -> None:
    import minigpt.memory

    big = GPT.random(GPTConfig(vocab_size=5000, n_positions=64, n_embd=16, n_layer=2, n_head=2))
    tokens = torch.zeros(8, 64, dtype=torch.long)
    logits_bytes = 8 * 64 * 5000 * 4
    monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: logits_bytes)  # too little for the logits
    started = []
    with pytest.raises(MemoryBudgetError, match="activations and logits"):
        big.run(tokens, edits={"embed": lambda x: started.append(1) or x})
    assert not started, "the forward began before the guard said no"
    monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: 10 * logits_bytes)
    big.run(tokens)  # fits
    with pytest.raises(MemoryBudgetError, match="KV cache"):
        monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: 2 * 8 * 4 * 16 * 4 * 20)
        big.generate(torch.zeros(8, 4, dtype=torch.long), 60, temperature=0)
    big.trace_budget_bytes = None  # the guard off: nothing refused
    big.run(tokens[:1, :4])


def test_grad_counts_every_block_and_open_attention_its_pattern() -> None:
    from minigpt.memory import forward_bytes

    plain = forward_bytes(CFG, 2, 10, 4)
    assert forward_bytes(CFG, 2, 10, 4, grad=True) > plain
    assert forward_bytes(CFG, 2, 10, 4, explicit_attention=True) == plain + 4 * 2 * 2 * CFG.n_head * 10 * 10


# ---------------------------------------------------------------------------------------------
# Item 7: every argument is checked; extreme settings behave as their limit


@pytest.mark.parametrize("call, message", [
    (lambda: GPT.random(CFG, dtype=torch.int64), "floating dtype"),
    (lambda: GPT.random(CFG, dtype="float32"), "floating dtype"),
    (lambda: GPT.random(CFG, device="cuda:7"), "use 'cpu'"),
    (lambda: GPT.random(CFG, device="nowhere"), "is not a device"),
    (lambda: GPT.random(CFG, device="meta"), "holds no values"),
    (lambda: GPT.random(CFG, seed=-1), "seed must be an integer"),
    (lambda: GPT.random(CFG, seed=2.5), "seed must be an integer"),
    (lambda: GPT.random("gpt5"), "unknown GPT-2 size"),
    (lambda: GPT.from_pretrained("/nonexistent", dtype=torch.bool), "floating dtype"),
    (lambda: MODEL.run(TOKENS, taps="embed", to="gpu0"), "is not a device"),
    (lambda: MODEL.run(TOKENS, taps="embed", store_dtype=torch.int8), "floating dtype"),
    (lambda: MODEL.tokens([1, 2], return_mask="yes"), "return_mask"),
    (lambda: MODEL.generate([1, 2], 3, temperature=float("nan")), "temperature"),
    (lambda: MODEL.generate([1, 2], 3, temperature=True), "temperature"),
    (lambda: MODEL.generate([1, 2], 3, top_p=0.0), "top_p"),
    (lambda: MODEL.generate([1, 2], 3, top_k=0), "top_k"),
    (lambda: MODEL.generate([1, 2], 3, seed=-5), "seed"),
    (lambda: MODEL.generate([1, 2], 3, seed=2**63), "seed"),
    (lambda: MODEL.generate([1, 2], 3, stop_at_eos="yes"), "stop_at_eos"),
    (lambda: MODEL.generate([1, 2], 2.5), "max_new_tokens"),
    (lambda: MODEL.estimate_trace_bytes("embed", 1, True), "seq must be a positive integer"),
])
def test_bad_arguments_are_input_errors(call, message: str) -> None:
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize("settings", [dict(temperature=1e-30), dict(temperature=1e-300, top_k=3),
                                      dict(temperature=1.0, top_p=1e-300), dict(temperature=5e-324)])
def test_extreme_sampling_settings_act_as_their_limit(settings) -> None:
    greedy = MODEL.generate(TOKENS, 5, temperature=0)
    assert torch.equal(MODEL.generate(TOKENS, 5, seed=1, **settings), greedy)


# ---------------------------------------------------------------------------------------------
# Item 9: threads


def test_generation_refuses_a_training_model_and_leaves_its_mode() -> None:
    model = GPT.random(CFG, seed=1)
    model.train()
    with pytest.raises(InputError, match="train mode"):
        model.generate(TOKENS, 3)
    assert model.training


def test_threads_may_share_a_model_in_eval_mode() -> None:
    model = GPT.random(CFG, seed=2)
    expected_run, _ = model.run(TOKENS, taps="blocks.*.resid_post")
    expected_ids = model.generate(TOKENS, 4, temperature=0)
    results, errors = [], []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                logits, trace = model.run(TOKENS, taps="blocks.*.resid_post", edits=edits.scale_block(0, 1.0))
                ids = model.generate(TOKENS, 4, temperature=0)
                results.append(torch.equal(logits, expected_run) and torch.equal(ids, expected_ids))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 20 and all(results)
