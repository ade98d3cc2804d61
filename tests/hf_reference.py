"""The reference side of the tests: random HuggingFace GPT-2 models, checkpoints, and hooks.

Everything the property tests compare against comes from here:
  * ``configs()`` / ``cases()``: hypothesis strategies for small random GPT-2 shapes and inputs;
  * ``make_hf``: a ``transformers.GPT2LMHeadModel`` (eager attention, eval mode) whose every
    parameter, biases and LayerNorm weights included, is redrawn at random, so that a mistake
    cannot hide behind a zero bias or a unit LayerNorm weight;
  * ``to_minigpt``: the same weights in a minigpt ``GPT``;
  * ``write_checkpoint``: the weights on disk in the hub's official layout or ``save_pretrained``'s;
  * ``hf_forward``: run HF with torch hooks, reading what the lecture notes read, named with
    minigpt's tap vocabulary, optionally after intervention hooks made the notes' way.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt import GPT, GPTConfig
from minigpt.weights import from_hf_state_dict

# ---------------------------------------------------------------------------------------------
# Strategies


@st.composite
def configs(draw, max_layer: int = 4, max_head: int = 4, max_d_head: int = 16, max_vocab: int = 300,
            max_positions: int = 32, min_embd: int = 1) -> dict:
    """A small random GPT-2 config, as ``GPT2Config`` keyword arguments (also valid config.json keys).

    ``min_embd``: the smallest d_model. float32 comparisons want a few dimensions at least, since
    a LayerNorm over one or two nearly equal values is ill-conditioned and magnifies rounding.
    """
    n_head = draw(st.integers(1, max_head))
    d_head = draw(st.integers(min(max_d_head, -(-min_embd // n_head)), max_d_head))
    return dict(
        vocab_size=draw(st.integers(2, max_vocab)),
        n_positions=draw(st.integers(1, max_positions)),
        n_embd=n_head * d_head,
        n_layer=draw(st.integers(1, max_layer)),
        n_head=n_head,
        n_inner=draw(st.none() | st.integers(1, 64)),
        # Log-uniform in [1e-5, 1e-1]: the epsilon matters most when it is large.
        layer_norm_epsilon=10 ** draw(st.floats(-5, -1)),
        activation_function="gelu_new",
        scale_attn_by_inverse_layer_idx=draw(st.booleans()),
    )


@dataclass(frozen=True)
class Case:
    """One example: a config, an input shape and a seed for the weights and the tokens."""

    config: dict
    batch: int
    seq: int
    seed: int

    def tokens(self) -> torch.Tensor:
        """Seeded random token ids [batch, seq] (int64)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        return torch.randint(self.config["vocab_size"], (self.batch, self.seq), generator=generator)


@st.composite
def cases(draw, max_batch: int = 3, **config_bounds) -> Case:
    """A random config with a batch of 1..max_batch sequences of 1..n_positions tokens."""
    config = draw(configs(**config_bounds))
    return Case(config, batch=draw(st.integers(1, max_batch)), seq=draw(st.integers(1, config["n_positions"])),
                seed=draw(st.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------------------------------------
# Models


def make_hf(config_kwargs: dict, seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with eager attention, in eval mode, every parameter drawn at random.

    Scales keep activations O(1) at any width: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    biases ~ N(0, 0.3^2), LayerNorm weights ~ 1 + N(0, 0.3^2). The unembedding stays tied.
    The noise is drawn in ``dtype`` (float32 for other dtypes), so one seed gives one model per dtype.
    """
    # Special-token ids inside the vocabulary, so transformers does not warn about them.
    special = {"bos_token_id": config_kwargs["vocab_size"] - 1, "eos_token_id": config_kwargs["vocab_size"] - 1}
    config = GPT2Config(**{**special, **config_kwargs}, attn_implementation="eager")
    # Built on the meta device: HF's own initialisation would be thrown away anyway (and takes
    # seconds at the 124M shape).
    with torch.device("meta"):
        hf = GPT2LMHeadModel(config)
    hf = hf.to_empty(device="cpu").to(dtype).eval()
    hf.tie_weights()
    draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():  # the tied lm_head is the same tensor as wte
            noise = torch.randn(param.shape, generator=generator, dtype=draw)
            if name.endswith(("wte.weight", "wpe.weight")):
                value = noise
            elif ".ln_" in name and name.endswith("weight"):
                value = noise.mul_(0.3).add_(1)
            elif name.endswith("bias"):
                value = noise.mul_(0.3)
            else:  # a Conv1D weight [in, out]
                value = noise.mul_(1 / math.sqrt(param.shape[0]))
            param.copy_(value)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "lm_head must stay tied"
    assert not list(hf.buffers()), "a buffer would be left uninitialised"
    return hf


def to_minigpt(hf: GPT2LMHeadModel) -> GPT:
    """The same model as minigpt: config through ``GPTConfig.from_hf``, weights through the name map."""
    cfg = GPTConfig.from_hf(hf.config.to_dict())
    dtype = hf.transformer.wte.weight.dtype
    model = GPT(cfg).to(dtype)
    state = from_hf_state_dict(hf.state_dict(), cfg, GPT.parameter_shapes)
    # As GPT.from_pretrained does: the tensors themselves (copies here, so HF's stay its own), Conv1D
    # weights as their transposed views.
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# Keys of the hub's own gpt2/config.json (plus the two optional shape keys we vary).
_OFFICIAL_CONFIG_KEYS = ("activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop",
                         "eos_token_id", "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx",
                         "n_embd", "n_head", "n_layer", "n_positions", "resid_pdrop", "vocab_size",
                         "n_inner", "scale_attn_by_inverse_layer_idx")


def official_state_dict(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """HF weights in the layout of the hub's official GPT-2 files.

    No ``transformer.`` prefix, Conv1D weights [in, out] as HF stores them, no ``lm_head``, and a
    causal-mask buffer ``h.N.attn.bias`` (float32 [1, 1, n_pos, n_pos]) per block.
    """
    n_pos = hf.config.n_positions
    state = {k.removeprefix("transformer."): v.detach().clone().contiguous()
             for k, v in hf.state_dict().items() if not k.startswith("lm_head")}
    mask = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.float32)).view(1, 1, n_pos, n_pos)
    for layer in range(hf.config.n_layer):
        state[f"h.{layer}.attn.bias"] = mask.clone()
    return state


def write_checkpoint(hf: GPT2LMHeadModel, directory: str | Path, layout: str = "official") -> Path:
    """Write ``hf`` to ``directory`` as config.json + model.safetensors; returns the directory.

    layout "official": the hub's GPT-2 files (see ``official_state_dict``) with a config.json
    holding the official keys; "save_pretrained": whatever ``hf.save_pretrained`` writes today.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "save_pretrained":
        hf.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
        return directory
    if layout != "official":
        raise ValueError(f"unknown layout {layout!r}")
    full = hf.config.to_dict()
    config = {k: full[k] for k in _OFFICIAL_CONFIG_KEYS if k in full}
    config["architectures"] = ["GPT2LMHeadModel"]
    config["n_ctx"] = hf.config.n_positions
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(official_state_dict(hf), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# ---------------------------------------------------------------------------------------------
# Hooks

# An intervention made the notes' way: (module, hook function, "forward" or "pre").
Hook = tuple[nn.Module, Callable, str]


def first_output(output):
    """A block's hidden state: element 0 of the tuple older transformers return, or the tensor itself."""
    return output[0] if isinstance(output, tuple) else output


def replace_first(output, new: torch.Tensor):
    """Put ``new`` where a block's hidden state is, keeping the rest of a tuple output."""
    return (new, *output[1:]) if isinstance(output, tuple) else new


def hf_forward(hf: GPT2LMHeadModel, tokens: torch.Tensor, hooks: Iterable[Hook] = (),
               record: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run HF on tokens [B, S] with intervention ``hooks``; read every point the notes read.

    Returns logits [B, S, V] and a dict keyed by minigpt tap names (values as the rest of the
    forward saw them, i.e. after the interventions), plus ``hidden_states`` (the tuple of
    ``output_hidden_states``). Intervention hooks run before every other hook, so the recording
    hooks on the same module see their result; all hooks are removed on return.
    """
    reads: dict[str, torch.Tensor] = {}
    H = hf.config.n_head
    d = hf.config.n_embd // H

    def save(name: str, transform: Callable = lambda x: x, pre: bool = False) -> Callable:
        def hook(module, args, output=None):
            value = args[0] if pre else first_output(output)
            reads[name] = transform(value).detach().clone()
        return hook

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, H, d]
        return x.view(*x.shape[:-1], H, d)

    def qkv(part: int) -> Callable:
        return lambda x: heads(x.split(hf.config.n_embd, dim=-1)[part])

    def scale(ln: nn.LayerNorm) -> Callable:  # a LayerNorm's input [B, S, D] -> its 1/sqrt(var + eps) [B, S, 1]
        return lambda x: (x.var(dim=-1, unbiased=False, keepdim=True) + ln.eps).rsqrt()

    with ExitStack() as stack, torch.no_grad():
        # Interventions go to the front of each module's hook list (in the given order), ahead of
        # transformers' own output-capturing hooks, so that output_hidden_states sees the edited
        # value whatever was installed earlier.
        for module, fn, kind in reversed(list(hooks)):
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            stack.callback(register(fn, prepend=True).remove)
        if record:
            t = hf.transformer
            points: list[tuple[nn.Module, str, Callable, bool]] = [
                (t.wte, "embed", lambda x: x, False),
                (t.wpe, "pos_embed", lambda x: x.expand(tokens.shape[0], -1, -1), False),
                (t.ln_f, "ln_f.scale", scale(t.ln_f), True),
                (t.ln_f, "ln_f", lambda x: x, False),
            ]
            for layer, block in enumerate(t.h):
                p = f"blocks.{layer}."
                points += [
                    (block, p + "resid_pre", lambda x: x, True),
                    (block.ln_1, p + "ln1.scale", scale(block.ln_1), True),
                    (block.ln_1, p + "ln1", lambda x: x, False),
                    (block.attn.c_attn, p + "attn.q", qkv(0), False),
                    (block.attn.c_attn, p + "attn.k", qkv(1), False),
                    (block.attn.c_attn, p + "attn.v", qkv(2), False),
                    (block.attn.c_proj, p + "attn.z", heads, True),
                    (block.attn.c_proj, p + "attn_delta", lambda x: x, False),
                    (block.ln_2, p + "resid_mid", lambda x: x, True),
                    (block.ln_2, p + "ln2.scale", scale(block.ln_2), True),
                    (block.ln_2, p + "ln2", lambda x: x, False),
                    (block.mlp.c_fc, p + "mlp.pre", lambda x: x, False),
                    (block.mlp.act, p + "mlp.post", lambda x: x, False),
                    (block.mlp.c_proj, p + "mlp_delta", lambda x: x, False),
                    (block, p + "resid_post", lambda x: x, False),
                ]
            for module, name, transform, pre in points:
                register = module.register_forward_pre_hook if pre else module.register_forward_hook
                stack.callback(register(save(name, transform, pre)).remove)
        out = hf(tokens, output_hidden_states=record, output_attentions=record)
    if record:
        reads["hidden_states"] = tuple(h.detach() for h in out.hidden_states)
        for layer, pattern in enumerate(out.attentions):
            reads[f"blocks.{layer}.attn.pattern"] = pattern.detach()
        reads["logits"] = out.logits.detach()
    return out.logits.detach(), reads


# The taps that make HuggingFace's hidden states (block 0's input, each block's output, ln_f).
HIDDEN = ["blocks.*.resid_pre", "blocks.*.resid_post", "ln_f"]


def assert_same_run(hf, model, tokens, our_edits, hf_hooks) -> None:
    """minigpt with ``our_edits`` and HF with ``hf_hooks`` give the same logits and hidden states.

    HF's hidden_states are block 0's input, each block's output, then ln_f's output, as are
    ``trace.hidden_states()`` (which prefers resid_post to the next block's possibly edited input).
    """
    hf_logits, reads = hf_forward(hf, tokens, hf_hooks)
    logits, trace = model.run(tokens, taps=HIDDEN, edits=our_edits)
    assert_close(logits, hf_logits, msg="logits")
    hidden, n_layer = reads["hidden_states"], model.cfg.n_layer
    assert len(hidden) == n_layer + 1
    ours = [trace["blocks.0.resid_pre"]] + [trace[f"blocks.{i}.resid_post"] for i in range(n_layer - 1)]
    for i, (a, b) in enumerate(zip(ours + [trace["ln_f"]], hidden, strict=True)):
        assert_close(a, b, msg=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(trace.hidden_states(), hidden, strict=True)):
        assert_close(a, b, msg=f"trace.hidden_states()[{i}]")


def fused_qkv(part: int, f, n_head: int):
    """HF hook: apply ``f`` to Q, K or V ([B, S, H, d]) inside c_attn's fused [B, S, 3D] output."""

    def hook(module, args, output):
        pieces = list(output.split(output.shape[-1] // 3, dim=-1))
        x = pieces[part]
        pieces[part] = f(x.view(*x.shape[:-1], n_head, -1)).flatten(-2)
        return torch.cat(pieces, dim=-1)

    return hook


def hf_hook_for(hf, name: str, f) -> list:
    """The HF hooks that apply ``f`` at minigpt tap ``name``, made the way the notes make them."""
    t = hf.transformer
    if name == "embed":
        return [(t.wte, lambda m, a, out: f(out), "forward")]
    if name == "ln_f":
        return [(t.ln_f, lambda m, a, out: f(out), "forward")]
    _, layer, tap = name.split(".", 2)
    block = t.h[int(layer)]
    H = hf.config.n_head
    simple = {"ln1": block.ln_1, "ln2": block.ln_2, "attn_delta": block.attn.c_proj, "mlp.pre": block.mlp.c_fc,
              "mlp.post": block.mlp.act, "mlp_delta": block.mlp.c_proj}
    if tap in simple:
        return [(simple[tap], lambda m, a, out: f(out), "forward")]
    if tap in ("attn.q", "attn.k", "attn.v"):
        return [(block.attn.c_attn, fused_qkv("qkv".index(tap[-1]), f, H), "forward")]
    if tap == "attn.z":  # c_proj's input is the heads' outputs, merged
        return [(block.attn.c_proj, lambda m, a: (f(a[0].view(*a[0].shape[:-1], H, -1)).flatten(-2),), "pre")]
    if tap == "resid_pre":
        return [(block, lambda m, a: (f(a[0]), *a[1:]), "pre")]
    if tap == "resid_post":  # element 0 of the block's output (a tuple in older transformers)
        return [(block, lambda m, a, out: replace_first(out, f(first_output(out))), "forward")]
    if tap == "resid_mid":
        # HF adds attention's output to the residual inside the block: to make the sum come out as
        # f(resid_mid), attention's output becomes f(resid_pre + attn) - resid_pre.
        seen = {}

        def remember(m, a):
            seen["resid_pre"] = a[0]

        def attn_out(m, a, out):
            r = seen["resid_pre"]
            return (f(r + out[0]) - r, *out[1:])

        return [(block, remember, "pre"), (block.attn, attn_out, "forward")]
    raise AssertionError(f"no HF hook for {name}")


def all_taps(model: GPT, tokens: torch.Tensor, **run_kwargs) -> tuple[torch.Tensor, dict]:
    """minigpt's run recording every tap ("*"), as a plain dict."""
    logits, trace = model.run(tokens, taps="*", **run_kwargs)
    return logits, dict(trace)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """Equal up to the precision of ``dtype`` (default: ``expected``'s), relative to the tensor's scale.

    float64: rtol 1e-10; float32: rtol 1e-5. The absolute tolerance is the relative one times
    the largest magnitude, so entries that cancel to near zero are judged against the tensor's
    scale rather than against themselves.
    """
    dtype = dtype or expected.dtype
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    actual, expected = actual.detach(), expected.detach()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0),
                               msg=lambda m: f"{msg}\n{m}" if msg else m)
