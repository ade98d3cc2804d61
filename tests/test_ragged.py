"""Batches of different lengths: padded runs equal single runs and HF with a mask.

Random configs and weights from hf_reference; float64 compared at a relative tolerance of 1e-10.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import assert_close, configs, make_hf, to_minigpt
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, InputError, edits
from minigpt.config import END_OF_TEXT_ID


@st.composite
def ragged(draw, max_rows: int = 3):
    """(HF model, minigpt model, a list of 1..max_rows id lists of different lengths)."""
    config = draw(configs())
    seed = draw(st.integers(0, 2**31 - 1))
    hf = make_hf(config, seed)
    lengths = draw(st.lists(st.integers(1, config["n_positions"]), min_size=1, max_size=max_rows))
    g = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randint(config["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    return hf, to_minigpt(hf), rows


def single(model: GPT, row: list[int], **kwargs):
    return model.run(torch.tensor([row]), **kwargs)


@given(case=ragged())
def test_every_real_position_equals_the_row_run_alone(case) -> None:
    _, model, rows = case
    logits, trace = model.run(rows, taps="*")
    S = max(map(len, rows))
    assert logits.shape[:2] == (len(rows), S)
    assert trace.mask.tolist() == [[True] * len(r) + [False] * (S - len(r)) for r in rows]
    for b, row in enumerate(rows):
        alone_logits, alone = single(model, row, taps="*")
        n = len(row)
        assert_close(logits[b, :n], alone_logits[0], msg=f"logits row {b}")
        for name, value in alone.items():
            if name.endswith(("attn.scores", "attn.pattern")):
                got = trace[name][b, :, :n, :n]
                if name.endswith("scores"):  # -inf above the diagonal on both sides
                    assert torch.equal(torch.isneginf(got), torch.isneginf(value[0]))
                    got, value = got.nan_to_num(neginf=0), value.nan_to_num(neginf=0)
                assert_close(got, value[0], msg=f"{name} row {b}")
            else:
                assert_close(trace[name][b, :n], value[0], msg=f"{name} row {b}")


def hf_with_mask(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's logits with an attention mask and the position ids its generate() derives (cumsum - 1)."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return hf(tokens, attention_mask=mask.long(), position_ids=positions).logits


@given(case=ragged(), left=st.booleans())
def test_padded_batches_equal_hf_with_its_attention_mask(case, left: bool) -> None:
    hf, model, rows = case
    S = max(map(len, rows))
    pad = [[0] * (S - len(r)) for r in rows]
    tokens = torch.tensor([p + r if left else r + p for r, p in zip(rows, pad)])
    mask = torch.tensor([[False] * len(p) + [True] * len(r) if left else [True] * len(r) + [False] * len(p)
                         for r, p in zip(rows, pad)])
    logits, trace = model.run(tokens, attention_mask=mask.int(), taps="ln_f", keep_positions="last")
    expected = hf_with_mask(hf, tokens, mask)
    assert_close(logits[mask], expected[mask], msg="real positions vs HF with attention_mask")
    last = torch.tensor([S - 1 if left else len(r) - 1 for r in rows])
    assert trace["ln_f"].shape[1] == 1
    assert_close(trace["ln_f"][:, 0], model.run(tokens, attention_mask=mask, taps="ln_f")[1]["ln_f"][
        torch.arange(len(rows)), last])
    if not left:  # the same batch given as a ragged list
        assert_close(model.run(rows)[0][mask], logits[mask])


def test_texts_of_different_lengths_and_the_tokens_helper() -> None:
    model = GPT.random(GPTConfig(n_positions=32, n_embd=16, n_layer=2, n_head=2), seed=1)  # GPT-2's vocabulary
    texts = ["The Eiffel Tower is in Paris", "Hello"]
    ids, mask = model.tokens(texts, return_mask=True)
    lengths = [len(model.tokenizer.encode(t)) for t in texts]
    assert mask.sum(1).tolist() == lengths and ids.shape == (2, max(lengths))
    assert (ids[~mask] == END_OF_TEXT_ID).all()  # padding ids are <|endoftext|>, never looked at
    assert torch.equal(model.tokens(texts), ids)
    logits, trace = model.run(texts, taps="blocks.0.resid_post", keep_positions="last")
    alone, _ = model.run("Hello")
    torch.testing.assert_close(logits[1, :lengths[1]], alone[0], rtol=1e-5, atol=1e-5)
    assert trace["blocks.0.resid_post"].shape == (2, 1, model.cfg.n_embd)


@pytest.mark.parametrize("bad, message", [
    ([[1, 2], []], "row 1 of the batch is empty"),
    (([[1, 2], [3, 4]], [[1, 1], [0, 0]]), "row 1 has no real token"),
    (([[1, 2], [3, 4]], [[1, 1]]), "attention_mask has shape"),
    (([[1, 2], [3, 4]], [[1, 2], [1, 1]]), "only 0 (padding) and 1"),
    (([[1, 2], [3]], [[1, 1], [1, 0]]), "drop attention_mask"),
])
def test_bad_padding_is_refused(bad, message: str) -> None:
    model = GPT.random(GPTConfig(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    inputs, mask = bad if isinstance(bad, tuple) else (bad, None)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.run(inputs, attention_mask=mask)


# ---------------------------------------------------------------------------------------------
# Generation on prompts of different lengths


@given(case=ragged(), data=st.data())
def test_ragged_generation_continues_each_prompt_as_alone(case, data) -> None:
    _, model, rows = case
    room = model.cfg.n_positions - max(map(len, rows))
    new = data.draw(st.integers(0, room), label="new tokens")
    temperature = data.draw(st.sampled_from([0, 1.3]), label="temperature")
    ids, trace = model.generate(rows, new, temperature=temperature, seed=5, taps=["blocks.*.resid_post", "logits"])
    assert ids.shape == (len(rows), max(map(len, rows)) + new)
    for b, row in enumerate(rows):
        alone = model.generate([row], new, temperature=temperature, seed=5 + b)
        n = len(row) + new
        assert torch.equal(ids[b, :n], alone[0]), f"row {b}"
        assert (ids[b, n:] == END_OF_TEXT_ID).all()
        assert trace.mask[b].tolist() == [True] * n + [False] * (ids.shape[1] - n)
    # The trace is that of a full forward over each returned row, real tokens first.
    full_logits, full = model.run([ids[b, :len(r) + new].tolist() for b, r in enumerate(rows)],
                                  taps=["blocks.*.resid_post", "logits"])
    real = trace.mask
    for name, value in full.items():
        assert_close(trace[name][real], value[real], msg=name)
    assert_close(trace["logits"][real], full_logits[real])


def test_ragged_generation_with_edits_taps_and_a_left_padded_mask() -> None:
    cfg = dict(vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=2)
    model = to_minigpt(make_hf(cfg, 3))
    prompts = [[5, 6, 7, 8], [9]]
    edit = edits.scale_block(0, 0.5)
    ids, trace = model.generate(prompts, 6, temperature=0, edits=edit, taps="blocks.1.attn.pattern")
    for b, prompt in enumerate(prompts):
        alone, alone_trace = model.generate([prompt], 6, temperature=0, edits=edit, taps="blocks.1.attn.pattern")
        n = len(prompt) + 6
        assert torch.equal(ids[b, :n], alone[0])
        assert_close(trace["blocks.1.attn.pattern"][b, :, :n, :n], alone_trace["blocks.1.attn.pattern"][0])
    # The same prompts left-padded with an HF-style mask give the same continuations.
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 0, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])
    assert torch.equal(model.generate(left, 6, temperature=0, edits=edit, attention_mask=mask), ids)
    steps = torch.stack(list(model.stream(prompts, 6, temperature=0, edits=edit)), dim=1)
    assert torch.equal(steps[1], ids[1, 1:7]) and torch.equal(steps[0], ids[0, 4:10])


def test_seeded_sampling_gives_each_row_its_own_generator() -> None:
    model = to_minigpt(make_hf(dict(vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=2), 4))
    a = model.generate([[1, 2], [1, 2]], 12, temperature=1.5, seed=7)
    assert not torch.equal(a[0], a[1])  # two rows, two generators
    assert torch.equal(a[1], model.generate([[1, 2]], 12, temperature=1.5, seed=8)[0])
    assert torch.equal(model.generate([[1, 2], [1, 2]], 12, temperature=1.5, seed=[8, 7]), a.flip(0))
    with pytest.raises(InputError, match="one per row"):
        model.generate([[1, 2], [1, 2]], 3, seed=[1])
    with pytest.raises(InputError, match="equal length"):
        model.generate([[1, 2], [1]], 3, compile=True)
