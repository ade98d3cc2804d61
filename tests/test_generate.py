"""Generation with a KV cache: cached = full forward, greedy = HuggingFace, edits and taps live.

Random configs and random weights from hf_reference; float64 compared at a relative tolerance of 1e-10.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import Case, assert_close, cases, make_hf, to_minigpt
from hypothesis import assume, given
from hypothesis import strategies as st

from minigpt import GPT, EditError, GPTConfig, InputError, MiniGPTError, edits
from minigpt.cli import main
from minigpt.fast_decode import StaticKVCache
from minigpt.generate import sample
from minigpt.kv_cache import KVCache


def model_and_prompt(case: Case, dtype: torch.dtype = torch.float64) -> tuple[GPT, torch.Tensor]:
    return to_minigpt(make_hf(case.config, case.seed, dtype)), case.tokens()


def room(data, case: Case, least: int = 1) -> int:
    """A number of new tokens that fits the context after the prompt (the case is skipped if none fits)."""
    assume(case.seq + least <= case.config["n_positions"])
    return data.draw(st.integers(least, case.config["n_positions"] - case.seq), label="new tokens")


def tiny(n_positions: int = 24, seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT:
    cfg = GPTConfig(vocab_size=61, n_positions=n_positions, n_embd=16, n_layer=2, n_head=2)
    return to_minigpt(make_hf({k: v for k, v in vars(cfg).items()}, seed, dtype))


# ---------------------------------------------------------------------------------------------
# The cache itself


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@given(case=cases(), data=st.data())
def test_cached_logits_equal_a_full_forward_at_every_step(case: Case, data, static: bool) -> None:
    """Feed the sequence in random chunks (prefill, single tokens, several at once): each chunk's logits
    equal those of a full forward over everything so far."""
    model, tokens = model_and_prompt(case)
    B, T = tokens.shape
    kind, capacity = (StaticKVCache, model.cfg.n_positions) if static else (KVCache, T)
    cache = kind(model.cfg, B, capacity, dtype=torch.float64, device="cpu")
    done = 0
    with torch.no_grad():
        while done < T:
            n = data.draw(st.integers(1, T - done), label="chunk")
            cached = model(tokens[:, done:done + n], cache=cache)
            full = model(tokens[:, :done + n])
            assert_close(cached, full[:, done:], msg=f"positions {done}..{done + n - 1}")
            done += n
    if not static:
        assert cache.length == T


def test_a_full_dynamic_cache_refuses_more() -> None:
    model = tiny()
    cache = KVCache(model.cfg, 1, 3, dtype=torch.float64, device="cpu")
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(InputError, match="do not fit"):
        model(torch.tensor([[4]]), cache=cache)


# ---------------------------------------------------------------------------------------------
# Greedy decoding equals HuggingFace's


@given(case=cases(max_batch=2), data=st.data())
def test_greedy_equals_hf_generate(case: Case, data) -> None:
    """Same random weights, do_sample=False; the end token stops a row (then it repeats, as HF pads
    with pad_token_id = eos) and stops the whole batch once every row has it, as HF does."""
    hf = make_hf(case.config, case.seed)
    model, tokens = to_minigpt(hf), case.tokens()
    n = room(data, case)
    eos = case.config["vocab_size"] - 1
    with torch.no_grad():
        expected = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)
    ours = model.generate(tokens, n, temperature=0, stop_at_eos=True, eos_id=eos)
    assert torch.equal(ours, expected)


# ---------------------------------------------------------------------------------------------
# Edits and taps live during generation


def chosen_edits(data, model: GPT) -> dict:
    """A mix of position-wise edits: scale a block, silence a head's keys, steer the residual."""
    cfg = model.cfg
    block = data.draw(st.integers(0, cfg.n_layer - 1), label="block")
    picks = data.draw(st.sets(st.sampled_from(["scale", "zero_keys", "add"]), min_size=1), label="edits")
    chosen = {}
    if "scale" in picks:
        chosen |= edits.scale_block(block, data.draw(st.sampled_from([0.1, 3.0, -1.0]), label="factor"))
    if "zero_keys" in picks:
        chosen |= edits.zero_head_keys(block, data.draw(st.integers(0, cfg.n_head - 1), label="head"))
    if "add" in picks:
        vector = torch.randn(cfg.n_embd, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        layer = data.draw(st.integers(0, cfg.n_layer - 1), label="steered block")
        chosen |= edits.add_vector(f"blocks.{layer}.resid_post", vector)
    return chosen


@given(case=cases(max_batch=2), data=st.data())
def test_edits_during_generation_equal_the_edit_in_a_full_forward(case: Case, data) -> None:
    model, tokens = model_and_prompt(case)
    n = room(data, case, least=2)
    chosen = chosen_edits(data, model)
    ids, trace = model.generate(tokens, n - 1, temperature=0, edits=chosen, taps="logits")
    assert ids.shape == (case.batch, case.seq + n - 1)
    full, _ = model.run(ids, edits=chosen)
    assert_close(trace["logits"], full)
    # Greedy under the edit: each new token is the argmax of the edited full forward before it.
    assert torch.equal(ids[:, case.seq:], full[:, case.seq - 1:-1].argmax(dim=-1))


@given(case=cases(max_batch=2, max_layer=2), data=st.data())
def test_taps_recorded_during_generation_equal_a_full_forward(case: Case, data) -> None:
    """Every tap, attention scores and patterns too: their growing key axis is padded with -inf / 0,
    which is what the causal mask puts there in a full forward."""
    model, tokens = model_and_prompt(case)
    n = room(data, case)
    temperature = data.draw(st.sampled_from([0.0, 1.0]), label="temperature")
    ids, trace = model.generate(tokens, n, temperature=temperature, seed=3, taps="*")
    _, full = model.run(ids, taps="*")
    assert trace.keys() == full.keys()
    for name in full:
        assert trace[name].shape == full[name].shape, name
        assert torch.equal(trace[name].isneginf(), full[name].isneginf()), name
        assert_close(trace[name], full[name], msg=name)


def test_edits_and_taps_together_and_pattern_edits() -> None:
    """An edit of the pattern (position-wise along queries) is live too; the trace shows the edited run."""
    model = tiny()
    chosen = {"blocks.1.attn.pattern": lambda p: p * 0.5} | edits.scale_block(0, 2.0)
    ids, trace = model.generate([[3, 4, 5]], 6, temperature=0, edits=chosen, taps=["blocks.*.resid_post", "logits"])
    logits, full = model.run(ids, edits=chosen, taps=["blocks.*.resid_post", "logits"])
    for name in full:
        assert_close(trace[name], full[name], msg=name)


def greedy_by_hand(model: GPT, rows: list[list[int]], n: int, tap: str, vector: torch.Tensor,
                   when: str | list[int]) -> list[list[int]]:
    """Greedy decoding without a cache, one row at a time: ``model.run`` over the growing sequence, with
    ``vector`` added at the positions ``during(..., when)`` means (step 0: the S prompt positions;
    step i: position S - 1 + i, the i-th new token), every other position unedited."""
    out = []
    for row in rows:
        ids, S = list(row), len(row)
        steps = {0} if when == "prompt" else set(range(1, n + 1)) if when == "new" else set(when)
        edited = [p for p in range(S + n) if (p < S and 0 in steps) or (p >= S and p - S + 1 in steps)]
        for _ in range(n):
            where = torch.tensor([p in edited for p in range(len(ids))])[None, :, None]
            logits, _ = model.run([ids], edits={tap: lambda x: torch.where(where, x + vector, x)})
            ids.append(int(logits[0, -1].argmax()))
        out.append(ids)
    return out


@pytest.mark.parametrize("when", ["prompt", "new", [0, 2], [1, 3]])
def test_during_limits_an_edit_to_the_prompt_new_tokens_or_steps_row_by_row(when) -> None:
    """Against a manual loop over the growing sequence, on a ragged batch with a 1-token prompt (where
    telling new tokens by their shape fails: the prefill is one position too)."""
    model, n, tap = tiny(), 5, "blocks.0.resid_post"
    vector = 3 * torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = [[5], [7, 1, 3, 2], [9, 4]]
    steered = edits.during(edits.add_vector(tap, vector), when)
    ids = model.generate(rows, n, temperature=0, edits=steered)
    expected = greedy_by_hand(model, rows, n, tap, vector, when)
    assert [ids[b, :len(rows[b]) + n].tolist() for b in range(len(rows))] == expected
    assert torch.stack(list(model.stream(rows, n, temperature=0, edits=steered)), dim=1).shape == (3, n)
    alone = model.generate([rows[0]], n, temperature=0, edits=steered)
    assert alone[0].tolist() == expected[0]
    plain = model.generate(rows, n, temperature=0)
    assert not torch.equal(ids, plain), "the steering changes nothing: the test would prove nothing"


def test_during_in_run_is_step_0_and_bad_arguments_are_refused() -> None:
    model, tap = tiny(), "blocks.0.resid_post"
    steer = edits.add_vector(tap, torch.ones(16, dtype=torch.float64))
    plain, steered = model.run([[1, 2, 3]])[0], model.run([[1, 2, 3]], edits=steer)[0]
    assert torch.equal(model.run([[1, 2, 3]], edits=edits.during(steer, "prompt"))[0], steered)
    assert torch.equal(model.run([[1, 2, 3]], edits=edits.during(steer, "new"))[0], plain)
    with pytest.raises(EditError, match="'prompt', 'new', or a list of steps"):
        edits.during(steer, "later")
    with pytest.raises(EditError, match="steps are integers >= 0"):
        edits.during(steer, [1, -2])
    with pytest.raises(EditError, match="is a tensor.*give a function"):
        edits.during({tap: torch.zeros(1, 3, 16)}, "prompt")


# ---------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    model = tiny()
    a = model.generate([[1, 2]], 20, temperature=1.5, seed=11)
    b = model.generate([[1, 2]], 20, temperature=1.5, seed=11)
    c = model.generate([[1, 2]], 20, temperature=1.5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@given(case=cases(max_batch=3), data=st.data())
def test_top_k_1_and_tiny_top_p_equal_greedy(case: Case, data) -> None:
    model, tokens = model_and_prompt(case)
    n = room(data, case)
    greedy = model.generate(tokens, n, temperature=0)
    assert torch.equal(model.generate(tokens, n, temperature=2.0, top_k=1, seed=5), greedy)
    assert torch.equal(model.generate(tokens, n, temperature=0.7, top_p=1e-9, seed=5), greedy)


def test_sampling_filters_keep_only_what_they_should() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    probs = logits.softmax(-1)[0]  # [0.032, 0.64, 0.23, 0.087, 0.012]
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample(logits, top_k=2, generator=g)) for _ in range(200)}
    assert seen_k == {1, 2}
    # top_p=0.8: 0.64 < 0.8, so the second token (0.64 + 0.23 >= 0.8) stays and the rest go.
    assert probs[1] < 0.8 <= probs[1] + probs[2]
    seen_p = {int(sample(logits, top_p=0.8, generator=g)) for _ in range(200)}
    assert seen_p == {1, 2}
    assert int(sample(logits, temperature=0)) == 1


# ---------------------------------------------------------------------------------------------
# Stopping, batches, streaming


def test_stop_at_eos_stops_and_finished_rows_repeat_it() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3], [7, 8, 9]])
    free = model.generate(prompt, 12, temperature=0)
    eos = int(free[0, 5])  # the third new token of row 0
    first = {row: (free[row, 3:] == eos).nonzero() for row in range(2)}
    stopped = model.generate(prompt, 12, temperature=0, stop_at_eos=True, eos_id=eos)
    ends = [int(first[r][0]) + 1 if len(first[r]) else 12 for r in range(2)]
    assert stopped.shape[1] == 3 + max(ends)
    for row in range(2):
        new = stopped[row, 3:]
        assert torch.equal(new[:ends[row]], free[row, 3:3 + ends[row]])
        assert (new[ends[row]:] == eos).all()
    # Alone, row 0 stops right at its end token.
    alone = model.generate(prompt[:1], 12, temperature=0, stop_at_eos=True, eos_id=eos)
    assert alone.shape[1] == 3 + ends[0] and int(alone[0, -1]) == eos


@given(case=cases(max_batch=3), data=st.data())
def test_batch_generation_equals_one_row_at_a_time(case: Case, data) -> None:
    model, tokens = model_and_prompt(case)
    n = room(data, case)
    together = model.generate(tokens, n, temperature=0)
    for row in range(case.batch):
        assert torch.equal(together[row:row + 1], model.generate(tokens[row:row + 1], n, temperature=0))


def test_stream_yields_what_generate_returns_and_accepts_every_prompt_form() -> None:
    model = tiny()
    ids = model.generate([5, 6, 7], 8, temperature=1.0, seed=2, top_k=10)
    steps = list(model.stream([5, 6, 7], 8, temperature=1.0, seed=2, top_k=10))
    assert len(steps) == 8 and all(s.shape == (1,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), ids[:, 3:])
    assert torch.equal(model.generate(torch.tensor([5, 6, 7]), 8, temperature=1.0, seed=2, top_k=10), ids)
    assert torch.equal(model.generate([5, 6, 7], 0), torch.tensor([[5, 6, 7]]))


def test_text_prompt_on_gpt2_vocabulary() -> None:
    model = GPT.random(GPTConfig(n_embd=16, n_layer=1, n_head=2, n_positions=32))
    ids = model.generate("Hello there", 5, temperature=0)
    prompt = model.tokenizer.encode("Hello there")
    assert ids[0, :len(prompt)].tolist() == prompt and ids.shape[1] == len(prompt) + 5


def test_generation_never_uses_dropout_and_leaves_the_mode_alone() -> None:
    model = tiny()
    model.train()
    # Switching the mode for the call would change it under another thread that trains the model.
    with pytest.raises(InputError, match=r"train mode.*model.eval\(\) first"):
        model.generate([[1, 2]], 6, temperature=0)
    with pytest.raises(InputError, match="train mode"):
        model.stream([[1, 2]], 6, temperature=0)
    assert model.training
    model.eval()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_context_limit_is_an_input_error_naming_the_way_out() -> None:
    model = tiny(n_positions=10)
    with pytest.raises(InputError, match="context of 10 positions; ask for at most 6 new tokens or keep only "
                                         "the last 3 prompt tokens"):
        model.generate([1, 2, 3, 4], 7)
    with pytest.raises(InputError, match="context of 10"):
        model.stream([1, 2, 3, 4], 7)  # refused before the first token
    assert model.generate([1, 2, 3, 4], 6).shape == (1, 10)  # filling the context exactly is fine
    assert model.generate([1, 2, 3, 4], 6, taps="logits")[1]["logits"].shape == (1, 10, 61)


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed="x"), "seed"),
    (dict(stop_at_eos=True, eos_id=61), "eos_id"),
    (dict(compile=True, edits=edits.scale_block(0, 2.0)), "compile"),
    (dict(compile=True, taps="logits"), "compile"),
    (dict(taps="nope"), "unknown tap"),
    (dict(edits={"nope": lambda x: x}), "unknown tap"),
])
def test_bad_settings_are_refused_before_anything_runs(settings: dict, message: str) -> None:
    model = tiny()
    settings = {"max_new_tokens": 3, **settings}
    with pytest.raises(MiniGPTError, match=message):
        model.generate([1, 2], **settings)


def test_a_replacement_tensor_edit_is_an_edit_error_before_the_prefill() -> None:
    """A replacement tensor fits the prompt's shape but not one new position's (and a 1-token prompt's
    shape would fit every step, silently): refused before anything runs, with the way out."""
    model = tiny()
    ran = []
    model.blocks[0].register_forward_hook(lambda *_: ran.append(1))
    for prompt in ([[1, 2, 3]], [[1]]):
        edit = torch.zeros(1, len(prompt[0]), 16, dtype=torch.float64)
        for call in (model.generate, model.stream):
            with pytest.raises(EditError, match=r"'blocks\.0\.resid_post' is a tensor.*give a function instead"):
                call(prompt, 2, edits={"blocks.0.resid_post": edit})
    assert not ran


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.filterwarnings("ignore:the edit at tap 'logits' produced")  # the edit's own warning, said elsewhere
def test_logits_that_give_no_distribution_are_an_input_error(poison: float, temperature: float) -> None:
    """NaN or +inf logits (or every one -inf) are refused by name, greedy or sampled, never torch's
    multinomial error; a row with some -inf (tokens banned by an edit) still samples."""
    logits = torch.zeros(2, 5)
    logits[1] = poison if poison == float("-inf") else 0
    logits[1, 2] = poison
    with pytest.raises(InputError, match="logits of row 1 are not finite"):
        sample(logits, temperature, generator=torch.Generator().manual_seed(0))
    banned = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf"), 0.0]])
    assert sample(banned, temperature, generator=torch.Generator().manual_seed(0)).item() in (0, 2, 4)
    model = tiny()
    with pytest.raises(InputError, match="not finite"):
        model.generate([[1, 2, 3]], 2, temperature=temperature, seed=0, edits={"logits": lambda x: x * poison})


# ---------------------------------------------------------------------------------------------
# Compiled decoding and the command


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
@pytest.mark.parametrize("rowdot", [True, False])
def test_compiled_decoding_equals_eager(rowdot: bool, monkeypatch) -> None:
    """compile=True (on CPU: dynamic shapes; at batch 1 one-row linears as row dot products where that
    measures faster, else the library's) gives the same tokens either way."""
    from minigpt import fast_decode
    monkeypatch.setattr(fast_decode, "rowdot_pays", lambda weight: rowdot)
    model = tiny(dtype=torch.float32)
    for prompt in ([[1, 2, 3]], [[1, 2, 3], [4, 5, 6]], [[9, 8, 7, 6, 5]]):
        expected = model.generate(prompt, 10, temperature=0)
        assert torch.equal(model.generate(prompt, 10, temperature=0, compile=True), expected)
        assert torch.equal(model.generate(prompt, 10, temperature=0.8, seed=4, compile=True),
                           model.generate(prompt, 10, temperature=0.8, seed=4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_rowdot_is_chosen_by_measurement_once_per_shape_dtype_and_threads(monkeypatch) -> None:
    from minigpt import fast_decode
    monkeypatch.setattr(fast_decode, "ROWDOT_VERDICTS", {})
    weight = torch.randn(40, 16)
    verdict = fast_decode.rowdot_pays(weight, calls=3)
    assert isinstance(verdict, bool) and fast_decode.ROWDOT_VERDICTS == {((40, 16), torch.float32,
                                                                        torch.get_num_threads()): verdict}
    fast_decode.ROWDOT_VERDICTS[(40, 16), torch.float32, torch.get_num_threads()] = not verdict
    assert fast_decode.rowdot_pays(weight) is (not verdict)  # measured once: the verdict is kept


@given(case=cases(), data=st.data())
def test_static_cache_decoding_equals_dynamic(case: Case, data) -> None:
    """The static cache (the GPU's compiled path) run eagerly: every slot beyond the length is masked."""
    model, tokens = model_and_prompt(case)
    n = room(data, case)
    B, S = tokens.shape
    expected = model.generate(tokens, n, temperature=0)
    cache = StaticKVCache(model.cfg, B, model.cfg.n_positions, dtype=torch.float64, device="cpu")
    ids = tokens
    with torch.no_grad():
        logits = model(tokens, cache=cache)[:, -1]
        for _ in range(n):
            new = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
            logits = model(new, cache=cache)[:, -1]
    assert torch.equal(ids, expected)
    assert int(cache.next) == S + n


def test_generate_command_prints_the_continuation(capsys) -> None:
    argv = ["generate", "Hello", "--model", "distilgpt2", "--random", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out) > len("Hello\n")
    assert main(argv) == 0 and capsys.readouterr().out == out  # greedy: the same again
    assert main(["generate", "Hello", "--model", "distilgpt2", "--random", "--max-new-tokens", "1024"]) == 2
    assert "context of 1024" in capsys.readouterr().err
