"""Generation's modules are what they claim: the cache and the loop a learner reads hold no compile
machinery (that is fast_decode.py's), and the decoding settings are checked once, when built."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig, InputError
from minigpt.fast_decode import StaticKVCache, one_at_a_time
from minigpt.generate import Decoding, Sampling
from minigpt.kv_cache import KVCache

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt"
# What only the fast path uses: compilation, CUDA graphs, guard stances, function modes.
FAST_ONLY = ("torch.compile(", "_dynamo", "set_stance", "mark_static_address", "TorchFunctionMode", "threading")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (``from .x import y`` as '.x', ``import torch.nn`` as 'torch.nn')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_kv_cache_module_is_only_the_cache() -> None:
    assert imported_modules(PACKAGE / "kv_cache.py") == {"__future__", "torch", ".errors"}
    source = (PACKAGE / "kv_cache.py").read_text(encoding="utf-8")
    assert not [word for word in (*FAST_ONLY, "static", "cuda") if word in source]


def test_the_compile_machinery_lives_in_fast_decode_only() -> None:
    for name in ("kv_cache.py", "generate.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        assert not [word for word in FAST_ONLY if word in source], name
    fast = (PACKAGE / "fast_decode.py").read_text(encoding="utf-8")
    assert all(word in fast for word in FAST_ONLY)  # the words above are the ones that path really uses
    assert ".generate" not in imported_modules(PACKAGE / "fast_decode.py")


def test_kv_cache_has_no_static_mode_and_the_static_cache_refuses_padding() -> None:
    cfg = GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    with pytest.raises(TypeError):
        KVCache(cfg, 1, 4, dtype=torch.float32, device="cpu", static=True)
    cache = StaticKVCache(cfg, 2, 8, dtype=torch.float32, device="cpu")
    assert isinstance(cache, KVCache)
    with pytest.raises(InputError, match="equal length only"):
        cache.extend(3, torch.tensor([[True, True, True], [True, True, False]]))
    positions, visible = cache.extend(3)
    assert positions.tolist() == [0, 1, 2] and visible.shape == (3, 8) and int(cache.next) == 3


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(seed=2**63), "seed"),
    (dict(seed=[1, "x"]), "seed"),
    (dict(stop_at_eos="yes"), "stop_at_eos must be True or False"),
])
def test_decoding_refuses_bad_settings_when_built(settings: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Decoding(**settings)


def test_decoding_checks_what_depends_on_the_batch_and_vocabulary_later() -> None:
    Decoding(seed=[1, 2], stop_at_eos=True, eos_id=500).check_for(2, 1000)  # fits: no error
    with pytest.raises(InputError, match="a list of 3 seeds for a batch of 2 prompts"):
        Decoding(seed=[1, 2, 3]).check_for(2, 100)
    with pytest.raises(InputError, match="seed must be an integer"):
        Decoding(seed=2**63 - 2).check_for(2, 100)  # seed + 1 would overflow
    with pytest.raises(InputError, match=r"eos_id 100 is outside the vocabulary \[0, 100\)"):
        Decoding(stop_at_eos=True, eos_id=100).check_for(1, 100)
    Decoding(eos_id=100).check_for(1, 100)  # not stopping at it: never checked, as before


def test_decoding_is_frozen_and_sampling_is_its_former_name() -> None:
    decoding = Decoding(temperature=0.5, top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoding.temperature = 2.0
    assert Sampling is Decoding and Sampling(temperature=0.5, top_k=3) == decoding


def test_a_second_compiled_generation_is_refused_while_one_runs() -> None:
    model = GPT.random(GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2), seed=0)
    with one_at_a_time(model):
        with pytest.raises(InputError, match="another generation with compile=True is running"):
            model.generate([1, 2], 2, compile=True)
        assert model.generate([1, 2], 2, temperature=0).shape == (1, 4)  # eager calls are not held up
    with one_at_a_time(model):  # given back when the first ended
        pass
