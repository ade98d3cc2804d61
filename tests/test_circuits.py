"""Weights as circuits: per-head weight views, factored OV/QK circuits, and weight processing.

Random float64 models whose every parameter is redrawn (biases and LayerNorms included, so that no
mistake hides behind a zero bias or a unit weight); the views must give what the taps record, the
factored algebra what the full matrices give, and each processed model the input model's logits
(or log-softmax, for center_unembed) to float64 rounding, with the input model untouched.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig, InputError
from minigpt import weight_views as views
from minigpt.circuits import FactoredMatrix, full_ov_circuit, ov_circuit, qk_circuit
from minigpt.processing import center_unembed, center_writing_weights, fold_ln, fold_value_biases, process_weights

CONFIGS = {
    "plain": GPTConfig(vocab_size=37, n_positions=16, n_embd=12, n_layer=2, n_head=3, n_inner=20,
                       layer_norm_epsilon=1e-3),
    "inverse_layer_scale": GPTConfig(vocab_size=29, n_positions=9, n_embd=8, n_layer=3, n_head=2,
                                     layer_norm_epsilon=1e-5, scale_attn_by_inverse_layer_idx=True),
}
TAPS = ["embed", "pos_embed", "blocks.*.ln1", "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v",
        "blocks.*.attn.scores", "blocks.*.attn.z", "blocks.*.attn_delta", "blocks.*.ln2", "blocks.*.mlp.pre",
        "blocks.*.mlp.post", "blocks.*.mlp_delta", "ln_f"]


def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """GPT.random's shape with every parameter redrawn in float64: matrices ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), biases ~ N(0, 0.3^2), LayerNorm weights ~ 1 + N(0, 0.3^2)."""
    model = GPT.random(cfg, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.startswith(("embed", "pos_embed")):
                param.copy_(noise)
            elif param.ndim == 1:
                param.copy_(noise * 0.3 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model


@pytest.fixture(params=list(CONFIGS))
def model(request) -> GPT:
    return random_model(CONFIGS[request.param])


def tokens(cfg: GPTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, (batch, cfg.n_positions), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Weight views


def test_views_give_what_the_taps_record(model: GPT) -> None:
    toks = tokens(model.cfg)
    logits, trace = model.run(toks, TAPS)
    S = toks.shape[1]
    close(trace["embed"], views.W_E(model)[toks])
    close(trace["pos_embed"][0], views.W_pos(model)[:S])
    close(logits, trace["ln_f"] @ views.W_U(model))
    for layer in range(model.cfg.n_layer):
        x, p = trace[f"blocks.{layer}.ln1"], f"blocks.{layer}.attn."
        for name, w, b in (("q", views.W_Q, views.b_Q), ("k", views.W_K, views.b_K), ("v", views.W_V, views.b_V)):
            got = torch.einsum("bsD,hDd->bshd", x, w(model)[layer]) + b(model)[layer]
            close(got, trace[p + name])
        z = trace[p + "z"]
        close(torch.einsum("bshd,hdD->bsD", z, views.W_O(model)[layer]) + views.b_O(model)[layer],
              trace[f"blocks.{layer}.attn_delta"])
        close(trace[f"blocks.{layer}.ln2"] @ views.W_in(model)[layer] + views.b_in(model)[layer],
              trace[f"blocks.{layer}.mlp.pre"])
        close(trace[f"blocks.{layer}.mlp.post"] @ views.W_out(model)[layer] + views.b_out(model)[layer],
              trace[f"blocks.{layer}.mlp_delta"])


def test_view_shapes(model: GPT) -> None:
    c = model.cfg
    L, H, D, d, M, V, P = c.n_layer, c.n_head, c.n_embd, c.d_head, c.d_mlp, c.vocab_size, c.n_positions
    expected = {"W_Q": (L, H, D, d), "W_K": (L, H, D, d), "W_V": (L, H, D, d), "W_O": (L, H, d, D),
                "b_Q": (L, H, d), "b_K": (L, H, d), "b_V": (L, H, d), "b_O": (L, D), "W_in": (L, D, M),
                "b_in": (L, M), "W_out": (L, M, D), "b_out": (L, D), "W_E": (V, D), "W_pos": (P, D), "W_U": (D, V)}
    for name, shape in expected.items():
        assert tuple(getattr(views, name)(model).shape) == shape, name
        if len(shape) > 2 or name.startswith("b_") or name in ("W_in", "W_out"):
            assert tuple(getattr(views, name)(model, layer=L - 1).shape) == shape[1:], name


def test_one_layer_views_are_views_and_writes_reach_the_model(model: GPT) -> None:
    H, d = model.cfg.n_head, model.cfg.d_head
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in", "W_out", "b_out"):
        stacked = getattr(views, name)(model)
        one = getattr(views, name)(model, layer=1)
        assert torch.equal(one, stacked[1]), name
        assert one._base is not None or isinstance(one, torch.nn.Parameter), f"{name} for one layer is a copy"
    with torch.no_grad():
        views.W_K(model, layer=1)[H - 1, 0, d - 1] = 7.0
    assert model.blocks[1].attn.qkv.weight[model.cfg.n_embd + H * d - 1, 0] == 7.0
    assert views.W_U(model).data_ptr() == model.embed.weight.data_ptr()  # tied: the same memory
    assert views.W_E(model) is model.embed.weight and views.W_pos(model) is model.pos_embed.weight


def test_views_refuse_bad_arguments(model: GPT) -> None:
    for layer in (model.cfg.n_layer, -1, True, 0.5):
        with pytest.raises(InputError, match="layer"):
            views.W_Q(model, layer=layer)
    with pytest.raises(InputError, match="minigpt GPT"):
        views.W_E(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# FactoredMatrix


def factors(m: int, k: int, n: int, batch: tuple[int, ...] = (), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, m, k, generator=generator, dtype=torch.float64),
            torch.randn(*batch, k, n, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("m, k, n", [(7, 3, 7), (5, 8, 5), (6, 2, 9), (4, 4, 4)])
def test_factored_norm_singular_values_and_eigenvalues_are_the_full_matrix_s(m: int, k: int, n: int) -> None:
    A, B = factors(m, k, n, batch=(2, 3))
    fm = FactoredMatrix(A, B)
    full = A @ B
    assert fm.shape == full.shape and fm.inner == k and fm.full_bytes == full.numel() * 8
    close(fm.full(), full)
    close(fm.norm(), torch.linalg.matrix_norm(full))
    rank = min(m, n, k)
    close(fm.singular_values, torch.linalg.svdvals(full)[..., :rank])
    if m == n:
        ours = fm.eigenvalues
        assert ours.shape[-1] == min(m, k)
        theirs = torch.linalg.eigvals(full)  # m of them; m - k of them ~0 when k < m
        for ev_ours, ev_full in zip(ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, m), strict=True):
            kept = ev_full[ev_full.abs().argsort(descending=True)[: min(m, k)]]
            close(torch.sort(ev_ours.abs()).values, torch.sort(kept.abs()).values, 1e-8)
            close(torch.sort(ev_ours.real).values, torch.sort(kept.real).values, 1e-8)
    else:
        with pytest.raises(InputError, match="square"):
            _ = fm.eigenvalues


def test_factored_products_stay_factored_and_equal_the_full_products() -> None:
    A, B = factors(6, 2, 5, batch=(3,))
    fm = FactoredMatrix(A, B)
    right, left = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    vec_m, vec_n = torch.randn(6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert isinstance(fm @ right, FactoredMatrix) and isinstance(left @ fm, FactoredMatrix)
    close((fm @ right).full(), A @ B @ right)
    close((left @ fm).full(), left @ A @ B)
    close(fm @ vec_n, A @ B @ vec_n)
    close(vec_m @ fm, vec_m @ (A @ B))
    other = FactoredMatrix(*factors(5, 3, 4, seed=1))
    product = fm @ other
    assert isinstance(product, FactoredMatrix) and product.inner == 2
    close(product.full(), A @ B @ other.full())
    close((other.T @ fm.T).full(), (A @ B @ other.full()).mT)
    close(fm[1].full(), A[1] @ B[1])
    close(fm[-1:].full(), A[-1:] @ B[-1:])
    full = A @ B
    close(fm.rows([0, 5, -1]).full(), full[..., [0, 5, -1], :])
    close(fm.rows(torch.tensor([2])).full(), full[..., [2], :])
    close(fm.rows(3).full(), full[..., 3:4, :])  # an int keeps the dim
    close(fm.columns(slice(1, 4)).full(), full[..., 1:4])
    assert fm.rows([1, 2]).inner == 2
    broadcast = FactoredMatrix(A, B[0])  # B's batch dims broadcast against A's
    close(broadcast.full(), A @ B[0])


def test_factored_refusals() -> None:
    A, B = factors(6, 2, 5, batch=(3,))
    fm = FactoredMatrix(A, B)
    with pytest.raises(InputError, match="inner"):
        FactoredMatrix(A, B.mT)
    with pytest.raises(InputError, match="do not broadcast"):
        FactoredMatrix(A, torch.randn(4, 2, 5, dtype=torch.float64))
    with pytest.raises(InputError, match="2 or more dims"):
        FactoredMatrix(torch.randn(3), B)
    with pytest.raises(InputError, match="dims that meet are 5 and 4"):
        fm @ torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="dtype"):
        fm @ torch.randn(5, 4, dtype=torch.float32)
    with pytest.raises(InputError, match="dtype"):
        fm @ FactoredMatrix(torch.randn(5, 2), torch.randn(2, 3))
    with pytest.raises(InputError, match="leading dims"):
        fm[0, 1]
    with pytest.raises(InputError, match="out of range"):
        fm[3]
    with pytest.raises(InputError, match=r"in \[-6, 5\]"):
        fm.rows([6])
    with pytest.raises(InputError, match="1-D list or tensor of ints"):
        fm.columns(torch.tensor([0.5]))
    with pytest.raises(InputError, match="1-D list or tensor of ints"):
        fm.rows("0")
    with pytest.raises(InputError, match=r"GiB .* over max_bytes=100"):
        fm.full(max_bytes=100)
    assert fm.full(max_bytes=None).shape == (3, 6, 5)


# ---------------------------------------------------------------------------------------------
# Circuits


def test_ov_and_qk_circuits(model: GPT) -> None:
    L, H = model.cfg.n_layer, model.cfg.n_head
    ov, qk = ov_circuit(model), qk_circuit(model)
    D = model.cfg.n_embd
    assert ov.shape == qk.shape == (L, H, D, D) and ov.inner == qk.inner == model.cfg.d_head
    toks = tokens(model.cfg, batch=1)
    _, trace = model.run(toks, ["blocks.*.ln1", "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v",
                                "blocks.*.attn.z", "blocks.*.attn.scores"])
    for layer in range(L):
        x, p = trace[f"blocks.{layer}.ln1"][0], f"blocks.{layer}.attn."
        for head in range(H):
            # the QK circuit is the bilinear form of the scores without biases (and before the scale)
            q = trace[p + "q"][0, :, head] - views.b_Q(model)[layer, head]
            k = trace[p + "k"][0, :, head] - views.b_K(model)[layer, head]
            close((x @ qk[layer, head]).full() @ x.T, q @ k.T)
            close(x @ ov[layer, head].full(), (trace[p + "v"][0, :, head] - views.b_V(model)[layer, head])
                  @ views.W_O(model)[layer, head])


def test_gradients_flow_from_the_circuits_to_the_weights(model: GPT) -> None:
    (ov_circuit(model).norm().sum() + qk_circuit(model).singular_values.sum()).backward()
    grad = model.blocks[1].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and model.blocks[0].attn.out.weight.grad.abs().sum() > 0


def test_full_ov_circuit_is_factored_and_bounded(model: GPT) -> None:
    c = model.cfg
    one = full_ov_circuit(model, layer=1, head=0)
    assert one.shape == (c.vocab_size, c.vocab_size) and one.inner == c.d_head
    expected = views.W_E(model) @ views.W_V(model)[1, 0] @ views.W_O(model)[1, 0] @ views.W_U(model)
    close(one.full(), expected)
    assert full_ov_circuit(model, layer=0).shape == (c.n_head, c.vocab_size, c.vocab_size)
    every = full_ov_circuit(model)
    assert every.shape == (c.n_layer, c.n_head, c.vocab_size, c.vocab_size)
    close(every[1, 0].full(), expected)
    with pytest.raises(InputError, match="GiB"):
        full_ov_circuit(model, max_bytes=1000)
    with pytest.raises(InputError, match="needs a layer"):
        full_ov_circuit(model, head=0)
    with pytest.raises(InputError, match="head"):
        full_ov_circuit(model, layer=0, head=c.n_head)


def test_the_full_ov_circuit_of_gpt2_is_refused_whole_but_not_factored() -> None:
    with torch.device("meta"):  # GPT-2's shapes, no memory
        gpt2 = GPT(GPTConfig())
    circuit = full_ov_circuit(gpt2, layer=0, head=0)
    assert circuit.shape == (50257, 50257)
    with pytest.raises(InputError, match=r"9\.41 GiB"):  # 50257^2 float32
        circuit.full()
    with pytest.raises(InputError, match="the full OV circuit's two factors"):
        full_ov_circuit(gpt2)  # every head's factors: 2 x 144 x 50257 x 64 x 4 bytes


# ---------------------------------------------------------------------------------------------
# Weight processing


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("process", [fold_ln, center_writing_weights, fold_value_biases, process_weights,
                                     lambda m: process_weights(m, center_unembed=False)])
def test_processing_keeps_the_logits_and_leaves_the_model_alone(model: GPT, process) -> None:
    before = snapshot(model)
    toks = tokens(model.cfg, batch=3)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[1, -3:] = False  # a padded row too
    new = process(model)
    assert new is not model and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        old_logits, new_logits = model(toks, mask=mask), new(toks, mask=mask)
    if process is process_weights:  # with center_unembed: log-softmax only
        close(new_logits.log_softmax(-1), old_logits.log_softmax(-1))
        assert not torch.allclose(new_logits, old_logits)
    else:
        close(new_logits, old_logits)
    assert "processed" in new.provenance


@pytest.mark.parametrize("process, same", [
    (fold_ln, ["blocks.*.resid_post", "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.mlp.pre"]),
    (center_writing_weights, ["blocks.*.ln1", "blocks.*.ln2", "ln_f", "blocks.*.attn.z", "blocks.*.mlp.post"]),
    (fold_value_biases, ["blocks.*.resid_post", "blocks.*.attn_delta", "blocks.*.attn.q"]),
])
def test_processing_keeps_the_taps_its_docstring_names(model: GPT, process, same: list[str]) -> None:
    toks = tokens(model.cfg)
    _, old = model.run(toks, same)
    _, new = process(model).run(toks, same)
    assert set(old) == set(new) and len(old) > 1
    for name in old:
        close(new[name], old[name])


def test_each_step_does_what_it_says(model: GPT) -> None:
    folded = fold_ln(model)
    for block in folded.blocks:
        for ln in (block.ln1, block.ln2):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))
        close(block.attn.qkv.weight.mean(dim=1), torch.zeros(3 * model.cfg.n_embd, dtype=torch.float64))
    assert torch.equal(folded.ln_f.weight, model.ln_f.weight)  # ln_f stays (tied unembedding)
    centred = center_writing_weights(model)
    zero_d = torch.zeros(model.cfg.n_positions, dtype=torch.float64)
    close(views.W_pos(centred).mean(dim=1), zero_d)
    close(views.W_O(centred).mean(dim=-1), torch.zeros_like(views.W_O(centred)[..., 0]))
    close(views.W_out(centred).mean(dim=-1), torch.zeros_like(views.W_out(centred)[..., 0]))
    close(views.b_O(centred).mean(-1), torch.zeros(model.cfg.n_layer, dtype=torch.float64))
    assert torch.equal(views.W_E(centred), views.W_E(model))  # tied to W_U: left as it is
    no_vb = fold_value_biases(model)
    assert torch.equal(views.b_V(no_vb), torch.zeros_like(views.b_V(no_vb)))


def test_center_unembed_shifts_each_position_s_logits_by_one_constant(model: GPT) -> None:
    new = center_unembed(model)
    close(views.W_U(new).mean(dim=1), torch.zeros(model.cfg.n_embd, dtype=torch.float64))
    toks = tokens(model.cfg)
    old_logits, old_trace = model.run(toks, ["blocks.0.resid_pre"])
    new_logits, new_trace = new.run(toks, ["blocks.0.resid_pre"])
    close(new_trace["blocks.0.resid_pre"], old_trace["blocks.0.resid_pre"])  # embed + pos_embed unchanged
    shift = new_logits - old_logits
    close(shift, shift[..., :1].expand_as(shift))
    assert shift.abs().max() > 1e-6  # a real shift: the test would catch a no-op


def test_processing_refuses_bad_arguments(model: GPT) -> None:
    with pytest.raises(InputError, match="fold_ln must be True or False"):
        process_weights(model, fold_ln=1)
    with pytest.raises(InputError, match="minigpt GPT"):
        fold_ln("gpt2")
    with torch.device("meta"):
        meta = GPT(CONFIGS["plain"])
    with pytest.raises(InputError, match="meta device"):
        fold_ln(meta)


# ---------------------------------------------------------------------------------------------
# TransformerLens (a test dependency only: skipped where it is not installed)


def test_processed_weights_equal_transformer_lens_s() -> None:
    """fold_ln + center_writing_weights + fold_value_biases give TransformerLens 3.9's weights, in float64.

    TransformerLens's steps are called one by one: its ``process_weights`` (and so
    ``load_and_process_state_dict``) casts every non-float32 tensor to float32 and back, which
    would leave float64 with float32's rounding. W_U and ln_f are not compared: TransformerLens
    folds ln_f into an untied W_U, which minigpt's tied head cannot hold (see processing.fold_ln);
    for the same reason TransformerLens centres W_E and minigpt does not.
    """
    pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install "
                        "transformer-lens==3.9.0, if it keeps your torch: check with --dry-run)")
    from hf_reference import make_hf, to_minigpt
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformer_lens.weight_processing import ProcessWeights

    shape = dict(vocab_size=31, n_positions=12, n_embd=12, n_layer=2, n_head=3, n_inner=20, layer_norm_epsilon=1e-4,
                 activation_function="gelu_new")
    hf = make_hf(shape, seed=5)  # float64, every parameter random
    model = to_minigpt(hf)
    cfg = HookedTransformerConfig(n_layers=2, d_model=12, n_ctx=12, d_head=4, n_heads=3, d_mlp=20, d_vocab=31,
                                  act_fn="gelu_new", eps=1e-4, normalization_type="LN", dtype=torch.float64,
                                  original_architecture="GPT2LMHeadModel", positional_embedding_type="standard")
    state = {k: v.detach().clone() for k, v in convert_gpt2_weights(hf, cfg).items()}
    for step in (ProcessWeights.fold_layer_norm, ProcessWeights.center_writing_weights,
                 ProcessWeights.fold_value_biases):
        state = step(state, cfg)
    ours = process_weights(model, center_unembed=False)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in", "W_out", "b_out"):
        part = "attn" if name[-1] in "QKVO" else "mlp"
        theirs = torch.stack([state[f"blocks.{layer}.{part}.{name}"] for layer in range(2)])
        close(getattr(views, name)(ours), theirs, 1e-12)
    close(views.W_pos(ours), state["pos_embed.W_pos"], 1e-12)
    mine_e = views.W_E(ours)
    assert torch.equal(mine_e, views.W_E(model))
    close(mine_e - mine_e.mean(dim=1, keepdim=True), state["embed.W_E"], 1e-12)


# ---------------------------------------------------------------------------------------------
# The README's worked example


def test_the_readme_example_runs_and_says_true() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Weights as circuits\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md (Weights as circuits)", "exec"), namespace)
    assert namespace["norms"].shape == (8, 4) and namespace["row"].shape == (1, 50257)
    assert round(namespace["copying"], 2) == 1.0  # as its comment says
    with pytest.raises(InputError, match=r"18\.82 GiB"):  # as the line after the block says
        namespace["circuit"].full()
    assert "18.82 GiB" in section


def test_the_views_attach_to_gpt() -> None:
    """GPT carries them as properties (``W_Q = property(W_Q)`` in its class body): nn.Module's attribute
    machinery must not get in the way of the properties."""
    model = GPT(CONFIGS["plain"])
    assert torch.equal(model.W_Q, views.W_Q(model)) and model.W_U.data_ptr() == model.embed.weight.data_ptr()
    assert model.b_O.shape == (2, 12) and model.OV.shape == (2, 3, 12, 12)
    assert model.full_ov_circuit(layer=0, head=1).shape == (37, 37)