"""The README's workflows run as written and give what HF's GPT-2 with torch hooks gives.

The README's "## Workflows" section holds a first ```python block (the model, the prompts, the
metric) and one block per "### " heading. Each workflow block runs after the first block, in a fresh
copy of its namespace; the test then redoes the same experiment on a ``GPT2LMHeadModel`` holding the
same weights, with hooks, and compares the numbers the block left behind.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hf_reference import first_output
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.weights import to_hf_state_dict

README = Path(__file__).resolve().parent.parent / "README.md"
WORKFLOWS = ["Activation patching over (layer, position)", "Head patching", "Attribution patching with gradients",
             "Direct logit attribution", "Steering in generation"]


def workflow_blocks() -> tuple[str, dict[str, str]]:
    """The Workflows section's first code block, and {heading: code block} for each workflow."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Workflows\n", 1)[1].split("\n## ", 1)[0]
    intro, *workflows = section.split("\n### ")
    code = re.compile(r"```python\n(.*?)```", re.S)
    blocks = {}
    for workflow in workflows:
        heading, body = workflow.split("\n", 1)
        found = code.findall(body)
        assert len(found) == 1, f"workflow {heading!r} should hold one python block"
        blocks[heading.strip()] = found[0]
    (setup,) = code.findall(intro)
    return setup, blocks


SETUP, BLOCKS = workflow_blocks()


@pytest.fixture(scope="module")
def setup() -> dict:
    namespace: dict = {}
    exec(compile(SETUP, "README.md (Workflows, first block)", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def hf(setup) -> GPT2LMHeadModel:
    """HF's GPT-2 (eager attention) holding the README model's weights."""
    model = setup["model"]
    config = GPT2Config(**model.cfg.to_hf(), attn_implementation="eager")
    with torch.device("meta"):
        hf = GPT2LMHeadModel(config)
    hf = hf.to_empty(device="cpu")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg.n_layer, official=False),
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def run_workflow(setup: dict, heading: str) -> dict:
    namespace = dict(setup)
    exec(compile(BLOCKS[heading], f"README.md ({heading})", "exec"), namespace)
    return namespace


def test_the_readme_holds_the_five_workflows_each_in_at_most_ten_lines() -> None:
    assert list(BLOCKS) == WORKFLOWS
    for heading, block in BLOCKS.items():
        lines = [line for line in block.splitlines() if line.strip()]
        assert len(lines) <= 10, f"{heading}: {len(lines)} lines"


# ---------------------------------------------------------------------------------------------
# HF with hooks: the same experiments


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32, relative to the tensor's own scale (random weights give small logits, so no floor at 1)."""
    actual, expected = actual.detach(), expected.detach()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def metric(logits: torch.Tensor, setup: dict) -> torch.Tensor:
    return logits[:, -1, setup["answer"]] - logits[:, -1, setup["wrong"]]


def hf_logits(hf: GPT2LMHeadModel, tokens: torch.Tensor, hooks=()) -> torch.Tensor:
    """HF's logits with ``hooks`` [(module, hook, "pre" or "forward")] in place for the call."""
    handles = [(m.register_forward_pre_hook if kind == "pre" else m.register_forward_hook)(fn) for m, fn, kind in hooks]
    try:
        return hf(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def captured(hf: GPT2LMHeadModel, tokens: torch.Tensor, modules: list, grad: bool = False) -> list[torch.Tensor]:
    """The inputs of ``modules`` in one HF run (on the autograd graph if ``grad``), and the logits last."""
    seen: list = [None] * len(modules)

    def keep(i):
        def hook(module, args):
            seen[i] = args[0]
        return hook

    with torch.set_grad_enabled(grad):
        logits = hf_logits(hf, tokens, [(m, keep(i), "pre") for i, m in enumerate(modules)])
    return seen + [logits]


def test_activation_patching(setup, hf) -> None:
    ours = run_workflow(setup, "Activation patching over (layer, position)")
    model, blocks = setup["model"], hf.transformer.h
    clean, corrupt = model.tokens(setup["clean"]), model.tokens(setup["corrupt"])
    *clean_inputs, _ = captured(hf, clean, list(blocks))
    expected = torch.zeros_like(ours["effect"])
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            for pos in range(clean.shape[1]):
                def put(module, args, layer=layer, pos=pos):
                    x = args[0].clone()
                    x[:, pos] = clean_inputs[layer][:, pos]
                    return (x, *args[1:])
                expected[layer, pos] = metric(hf_logits(hf, corrupt, [(block, put, "pre")]), setup)
    assert_close(ours["effect"], expected)


def test_head_patching(setup, hf) -> None:
    ours = run_workflow(setup, "Head patching")
    model = setup["model"]
    d = model.cfg.d_head
    clean, corrupt = model.tokens(setup["clean"]), model.tokens(setup["corrupt"])
    projections = [block.attn.c_proj for block in hf.transformer.h]
    *clean_z, _ = captured(hf, clean, projections)  # c_proj's input: the heads' z side by side [B, S, D]
    expected = torch.zeros_like(ours["head_effect"])
    with torch.no_grad():
        for layer, projection in enumerate(projections):
            for head in range(model.cfg.n_head):
                def put(module, args, layer=layer, head=head):
                    z = args[0].clone()
                    z[..., head * d:(head + 1) * d] = clean_z[layer][..., head * d:(head + 1) * d]
                    return (z,)
                expected[layer, head] = metric(hf_logits(hf, corrupt, [(projection, put, "pre")]), setup)
    assert_close(ours["head_effect"], expected)


def test_attribution_patching(setup, hf) -> None:
    ours = run_workflow(setup, "Attribution patching with gradients")
    model, blocks = setup["model"], list(hf.transformer.h)
    clean, corrupt = model.tokens(setup["clean"]), model.tokens(setup["corrupt"])
    *clean_inputs, _ = captured(hf, clean, blocks)
    *corrupt_inputs, logits = captured(hf, corrupt, blocks, grad=True)
    grads = torch.autograd.grad(metric(logits, setup).sum(), corrupt_inputs)
    expected = torch.stack([(g * (c - x.detach())).sum(-1)[0] for g, c, x in zip(grads, clean_inputs, corrupt_inputs)])
    assert ours["estimate"].shape == (model.cfg.n_layer, clean.shape[1])
    assert_close(ours["estimate"], expected)
    # Where the prompts agree (before the changed name) the activations are equal: no estimate.
    first_change = int((clean != corrupt).int().argmax())
    assert (ours["estimate"][:, :first_change] == 0).all()


def test_direct_logit_attribution(setup, hf) -> None:
    ours = run_workflow(setup, "Direct logit attribution")
    model = setup["model"]
    cfg, t = model.cfg, hf.transformer
    clean = model.tokens(setup["clean"])
    reads: dict = {}

    def keep(name, pre=False):
        def hook(module, args, output=None):
            reads[name] = args[0] if pre else first_output(output)
        return hook

    hooks = [(t.wte, keep("embed"), "forward"), (t.wpe, keep("pos_embed"), "forward"),
             (t.ln_f, keep("resid", pre=True), "pre")]
    for layer, block in enumerate(t.h):
        hooks += [(block.attn.c_proj, keep(f"z{layer}", pre=True), "pre"),
                  (block.mlp.c_proj, keep(f"mlp{layer}"), "forward")]
    with torch.no_grad():
        logits = hf_logits(hf, clean, hooks)
    # The residual at the last position, split by hand: each head's z_h @ W_O[h], the bias, the MLP.
    at = lambda x: x[0, -1]  # noqa: E731
    parts, labels = [at(reads["embed"]), at(reads["pos_embed"])], ["embed", "pos_embed"]
    for layer, block in enumerate(t.h):
        z = at(reads[f"z{layer}"]).view(cfg.n_head, cfg.d_head)
        w_o = block.attn.c_proj.weight.detach().view(cfg.n_head, cfg.d_head, cfg.n_embd)  # Conv1D: [in, out]
        parts += [*torch.einsum("hd,hdm->hm", z, w_o), block.attn.c_proj.bias.detach(), at(reads[f"mlp{layer}"])]
        labels += [f"blocks.{layer}.attn.heads[{h}]" for h in range(cfg.n_head)]
        labels += [f"blocks.{layer}.attn.out.bias", f"blocks.{layer}.mlp_delta"]
    parts = torch.stack(parts)
    resid = at(reads["resid"])
    scale = (resid.var(unbiased=False) + t.ln_f.eps).rsqrt()
    w_u = t.wte.weight.detach()
    direction = t.ln_f.weight.detach() * (w_u[setup["answer"]] - w_u[setup["wrong"]])
    expected = ((parts - parts.mean(-1, keepdim=True)) * scale) @ direction
    assert ours["labels"] == labels
    assert_close(ours["dla"], expected)
    bias_term = t.ln_f.bias.detach() @ (w_u[setup["answer"]] - w_u[setup["wrong"]])
    assert_close(ours["dla"].sum() + ours["rest"], metric(logits, setup)[0])
    assert_close(ours["rest"], bias_term)


def test_steering_in_generation(setup, hf) -> None:
    ours = run_workflow(setup, "Steering in generation")
    model = setup["model"]
    block = hf.transformer.h[2]
    with torch.no_grad():
        love, hate = (captured(hf, model.tokens(word), [block])[0][0, -1] for word in ("Love", "Hate"))
    assert_close(ours["steer"], love - hate)
    steer = 4 * (love - hate)

    def add(module, args):
        return (args[0] + steer, *args[1:])

    ids = model.tokens("I think that you are")
    with torch.no_grad():
        for _ in range(8):  # greedy, the whole sequence each step, the vector added at every position
            logits = hf_logits(hf, ids, [(block, add, "pre")])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours["ids"], ids)
