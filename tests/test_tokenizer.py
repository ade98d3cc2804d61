"""GPT-2's BPE as model.tokenizer: the known ids, round trips, and text in run()."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, InputError
from minigpt.tokenizer import gpt2_tokenizer

HELLO = "Hello world, this is GPT-2."
HELLO_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]


@pytest.fixture(scope="module")
def model() -> GPT:
    """GPT-2's vocabulary and context, but one narrow block: cheap to run."""
    return GPT.random(GPTConfig(n_layer=1, n_embd=8, n_head=2), seed=0, dtype=torch.float64)


def test_known_encoding(model: GPT) -> None:
    assert model.tokenizer is gpt2_tokenizer()
    assert model.tokenizer.encode(HELLO) == HELLO_IDS
    assert model.tokenizer.decode(HELLO_IDS) == HELLO
    assert model.tokenizer.n_vocab == 50257 == model.cfg.vocab_size
    assert model.tokenizer.encode("<|endoftext|>", allowed_special="all") == [50256]


@given(text=st.text(max_size=60))
def test_decode_inverts_encode(text: str) -> None:
    tokenizer = gpt2_tokenizer()  # what model.tokenizer returns
    ids = tokenizer.encode(text, disallowed_special=())
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text


def test_run_accepts_text(model: GPT) -> None:
    from_text, trace = model.run(HELLO, taps="embed")
    from_ids, _ = model.run(HELLO_IDS)
    assert from_text.shape == (1, len(HELLO_IDS), 50257)
    assert torch.equal(from_text, from_ids)
    assert torch.equal(from_text, model(torch.tensor([HELLO_IDS])))
    assert torch.equal(trace["embed"][0], model.embed.weight[HELLO_IDS].detach())
    # The end-of-text marker is one token in text given to run().
    with_eot, _ = model.run("<|endoftext|>" + HELLO)
    assert with_eot.shape[1] == len(HELLO_IDS) + 1


def test_empty_text_is_refused(model: GPT) -> None:
    with pytest.raises(InputError, match="empty"):
        model.run("")


def test_tokenizer_conveniences_on_the_model() -> None:
    model = GPT.random(GPTConfig(n_positions=32, n_embd=16, n_layer=1, n_head=2))  # GPT-2's vocabulary
    assert model.str_tokens("Hello there, café") == ["Hello", " there", ",", " café"]
    assert model.str_tokens(["a b", "c"]) == [["a", " b"], ["c"]]
    assert model.str_tokens([15496, 612]) == ["Hello", " there"]
    assert model.str_tokens("Hi", prepend_bos=True) == ["<|endoftext|>", "Hi"]
    assert model.token_id(" Paris") == model.tokenizer.encode(" Paris")[0]
    with pytest.raises(InputError, match=r"is 3 tokens, \['Paris', 'ian', ' dreams'\], not one"):
        model.token_id("Parisian dreams")
    with pytest.raises(InputError, match="leading space"):
        model.token_id("unbelievable")
    # BOS: off by default, one <|endoftext|> before each text when asked for.
    ids, mask = model.tokens(["Hello", "Hello there"], prepend_bos=True, return_mask=True)
    assert ids[:, 0].tolist() == [50256, 50256] and mask.sum(1).tolist() == [2, 3]
    assert model.tokens("Hello").tolist() == [[15496]]
    with pytest.raises(InputError, match="prepend_bos"):
        model.tokens([1, 2], prepend_bos=True)
