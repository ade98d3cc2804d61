"""Loading checkpoints: both on-disk layouts, the hub cache offline, the full
GPT-2-small shape, one error listing every bad tensor, and pickles never opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hf_reference import Case, assert_close, cases, make_hf, official_state_dict, to_minigpt, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minigpt import GPT, OFFICIAL, CheckpointError, GPTConfig, HubError
from minigpt.weights import from_hf_state_dict, to_hf_state_dict

LAYOUTS = ["official", "save_pretrained"]
TINY = dict(vocab_size=60, n_positions=12, n_embd=16, n_layer=2, n_head=4, n_inner=None, layer_norm_epsilon=1e-4,
            activation_function="gelu_new")


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


# ---------------------------------------------------------------------------------------------
# Both layouts


@settings(max_examples=8)
@given(case=cases(max_layer=3), layout=st.sampled_from(LAYOUTS))
def test_both_layouts_load_and_match_hf(case: Case, layout: str) -> None:
    hf = make_hf(case.config, case.seed, torch.float64)
    tokens = case.tokens()
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(hf, directory, layout)
        model = GPT.from_pretrained(directory, dtype=torch.float64)
    assert model.cfg == GPTConfig.from_hf(hf.config.to_dict())
    assert_close(model(tokens), hf_logits(hf, tokens))
    # Bit for bit the model that to_minigpt builds in memory.
    assert torch.equal(model(tokens), to_minigpt(hf)(tokens))
    assert not model.training


def test_official_layout_is_what_the_hub_ships(tmp_path: Path) -> None:
    """The file the test writes has the official file's traits: no prefix, [in, out], mask buffers, no lm_head."""
    hf = make_hf(TINY, seed=1)
    tensors = load_file(str(write_checkpoint(hf, tmp_path, "official") / "model.safetensors"))
    assert "h.0.attn.c_attn.weight" in tensors and "wte.weight" in tensors
    assert not any(k.startswith(("transformer.", "lm_head")) for k in tensors)
    assert tensors["h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: [in, out]
    assert tensors["h.1.attn.bias"].shape == (1, 1, 12, 12) and tensors["h.1.attn.bias"].dtype == torch.float32
    pretrained = load_file(str(write_checkpoint(hf, tmp_path / "sp", "save_pretrained") / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in pretrained if not k.startswith("lm_head"))


def test_float32_load_of_float64_checkpoint_casts(tmp_path: Path) -> None:
    hf = make_hf(TINY, seed=2)
    model = GPT.from_pretrained(write_checkpoint(hf, tmp_path), dtype=torch.float32)
    assert model.embed.weight.dtype == torch.float32
    tokens = torch.arange(12).view(1, 12)
    assert_close(model(tokens).double(), hf_logits(hf, tokens), dtype=torch.float32)


def test_to_hf_state_dict_round_trip() -> None:
    hf = make_hf(TINY, seed=3)
    model = to_minigpt(hf)
    ours = model.state_dict()
    cfg = model.cfg
    official = to_hf_state_dict(ours, cfg.n_layer, official=True)
    prefixed = to_hf_state_dict(ours, cfg.n_layer, official=False)
    # Exactly HF's own tensors under HF's own names.
    hf_state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert prefixed.keys() == hf_state.keys()
    assert all(torch.equal(prefixed[k], hf_state[k]) for k in hf_state)
    assert official.keys() == {k.removeprefix("transformer.") for k in hf_state}
    for back in (from_hf_state_dict(official, cfg, GPT.parameter_shapes), from_hf_state_dict(prefixed, cfg, GPT.parameter_shapes)):
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours)


# ---------------------------------------------------------------------------------------------
# The full GPT-2-small shape


@pytest.mark.slow
def test_full_gpt2_small_shape_official_layout_matches_hf(tmp_path: Path) -> None:
    """124M random weights in the hub's official layout, float32, a short input."""
    cfg = OFFICIAL["gpt2"]
    config = dict(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon, activation_function="gelu_new")
    hf = make_hf(config, seed=124, dtype=torch.float32)
    assert sum(p.numel() for p in hf.parameters()) == 124_439_808
    write_checkpoint(hf, tmp_path, "official")
    assert len(load_file(str(tmp_path / "model.safetensors"))) == 148 + 12  # 148 learned + 12 mask buffers
    model = GPT.from_pretrained(tmp_path)
    assert model.cfg == cfg
    tokens = torch.tensor([[15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13], [50256, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    logits, trace = model.run(tokens, taps=["blocks.*.resid_pre", "ln_f"])
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    assert_close(logits, out.logits, msg="logits")
    for i, (a, b) in enumerate(zip(trace.hidden_states(), out.hidden_states, strict=True)):
        assert_close(a, b, msg=f"hidden_states[{i}]")


# ---------------------------------------------------------------------------------------------
# The hub cache, offline


def put_in_hub_cache(cache: Path, repo_id: str, files: Path, commit: str = "a" * 40) -> Path:
    """Lay ``files`` out as huggingface_hub's cache does: blobs by sha256, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in files.iterdir():
        if not file.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty hub cache in tmp_path, with HF_HUB_OFFLINE=1 (in the environment and in huggingface_hub,
    which reads the environment once, at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_name_loads_from_the_cache_offline(offline_hub: Path, tmp_path: Path, layout: str) -> None:
    hf = make_hf(TINY, seed=4)
    put_in_hub_cache(offline_hub, "someone/tiny-gpt2", write_checkpoint(hf, tmp_path / "files", layout))
    model = GPT.from_pretrained("someone/tiny-gpt2", dtype=torch.float64)
    tokens = torch.arange(24).view(2, 12) % 60
    assert_close(model(tokens), hf_logits(hf, tokens))
    assert "someone/tiny-gpt2" in model.provenance


def test_missing_model_offline_says_offline(offline_hub: Path) -> None:
    with pytest.raises(HubError, match="offline") as info:
        GPT.from_pretrained("someone/not-in-the-cache")
    assert "not-in-the-cache" in str(info.value)


def test_offline_environment_is_honoured_by_a_fresh_process(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before Python starts, as a user would set them."""
    hf = make_hf(TINY, seed=5)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "gpt2", write_checkpoint(hf, tmp_path / "files", "official"))
    tokens = torch.arange(12).view(1, 12)
    torch.save(hf_logits(hf, tokens), tmp_path / "expected.pt")
    script = f"""
import torch
from minigpt import GPT, HubError
model = GPT.from_pretrained("gpt2", dtype=torch.float64)
expected = torch.load({str(tmp_path / "expected.pt")!r})
torch.testing.assert_close(model(torch.arange(12).view(1, 12)), expected, rtol=1e-10, atol=1e-10)
try:
    GPT.from_pretrained("gpt2-medium")
except HubError as e:
    assert "offline" in str(e), e
else:
    raise AssertionError("gpt2-medium is not cached: loading it offline must fail")
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_loading_builds_on_meta_without_initialising_or_importing_dynamo(tmp_path: Path) -> None:
    """The meta-device build skips initialisation: torch's first normal_ on meta would import torch._dynamo
    (about 1 s and 80 MiB), which a load has no reason to pay. In a fresh process, where nothing imported it."""
    hf = make_hf(TINY, seed=6)
    directory = write_checkpoint(hf, tmp_path / "files", "official")
    script = f"""
import sys
from minigpt import GPT
model = GPT.from_pretrained({str(directory)!r})
assert "torch._dynamo" not in sys.modules, "loading imported torch._dynamo"
assert float(model.embed.weight.abs().sum()) > 0 and not any(p.is_meta for p in model.parameters())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Bad checkpoints


def test_every_bad_tensor_is_listed_in_one_error(tmp_path: Path) -> None:
    hf = make_hf(TINY, seed=6)
    tensors = official_state_dict(hf)
    del tensors["h.1.ln_2.bias"], tensors["ln_f.weight"]  # missing
    tensors["h.0.attn.extra.weight"] = torch.zeros(3)  # unexpected
    tensors["h.1.mlp.c_fc.bias"] = torch.zeros(7, dtype=torch.float64)  # mis-shaped
    tensors["h.0.mlp.c_proj.weight"] = tensors["h.0.mlp.c_proj.weight"].t().contiguous()  # transposed
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        GPT.from_pretrained(tmp_path)
    message = str(info.value)
    for name in ("h.1.ln_2.bias", "ln_f.weight", "h.0.attn.extra.weight", "h.1.mlp.c_fc.bias", "h.0.mlp.c_proj.weight"):
        assert name in message, name
    assert "missing 2" in message and "unexpected 1" in message and "mis-shaped 2" in message


class BoobyTrap:
    """Unpickling this creates ``marker``: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path: Path) -> None:
    hf = make_hf(TINY, seed=7)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    marker = tmp_path / "UNPICKLED"
    with open(checkpoint / "pytorch_model.bin", "wb") as f:
        pickle.dump({"trap": BoobyTrap(marker), **hf.state_dict()}, f)
    # The trap is armed: unpickling a copy of it springs it.
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(BoobyTrap(armed)))
    assert armed.exists()

    with pytest.raises(CheckpointError) as info:
        GPT.from_pretrained(checkpoint)
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists(), "minigpt unpickled pytorch_model.bin"


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    save_file(official_state_dict(make_hf(TINY)), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(tmp_path)
