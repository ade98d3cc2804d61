"""Probes refuse an argument outside its domain with an InputError that names it and its range:
nothing is clamped, nothing fails deep inside with a raw torch error."""
from __future__ import annotations

import pytest
import torch

import probes
from minigpt import GPT, GPTConfig
from minigpt.errors import InputError

SMALL = GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
TOKENS = [[3, 1, 4, 1, 5, 9]]  # 6 positions


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(SMALL, seed=1)


@pytest.mark.parametrize("probe, kwargs, message", [
    (probes.lens, {"position": 6}, r"position 6 is out of range: .* have 6 \(valid: 0\.\.5"),
    (probes.lens, {"position": -7}, r"position -7 is out of range"),
    (probes.lens, {"k": 0}, r"k must be an integer of at least 1 and at most 50, got 0"),
    (probes.lens, {"k": 2.5}, r"k must be an integer"),
    (probes.attribute, {"position": 6}, r"position 6 is out of range"),
    (probes.attribute, {"target": 50}, r"target 50 is out of range: .* have 50 \(valid: 0\.\.49"),
    (probes.attribute, {"target": True}, r"target must be an integer, got True"),
    (probes.intervene, {"block": 2}, r"block 2 is out of range"),
    (probes.intervene, {"head": 9}, r"head 9 is out of range"),
    (probes.intervene, {"noise_std": -1.0}, r"noise_std must be a number of at least 0"),
    (probes.intervene, {"noise_mean": float("nan")}, r"noise_mean must be a number"),
    (probes.intervene, {"factors": (0.1, 0.0)}, r"each of factors must be a number of at least 1e-06"),
    (probes.intervene, {"factors": (1, 10)}, r"a factor of 1 changes nothing"),
    (probes.reconstruct, {"pair": (0, 3)}, r"pair \(0, 3\) must index residual states 0\.\.2"),
    (probes.reconstruct, {"pair": (0,)}, r"pair \(0,\) must index residual states"),
    (probes.reconstruct, {"max_points": 0}, r"max_points must be an integer of at least 1"),
    (probes.reconstruct, {"top_fraction": 1.0}, r"top_fraction must be in \[0, 1\)"),
    (probes.reconstruct, {"outliers": "most"}, r"unknown outlier rule 'most'"),
    (probes.measure_distributions, {"bins": 0}, r"bins must be an integer of at least 1"),
])
def test_out_of_domain_arguments_are_refused(model, probe, kwargs, message):
    with pytest.raises(InputError, match=message):
        probe(model, TOKENS, **kwargs)


# probes.lens and probes.attribute read batches (tests/test_sweeps.py).
@pytest.mark.parametrize("probe", [probes.reconstruct, probes.check_final_norm, probes.intervene,
                                   probes.measure_distributions])
def test_every_probe_says_plainly_it_reads_one_sequence(model, probe):
    with pytest.raises(InputError, match="probes read one sequence, got a batch of 2; .*loop over the batch"):
        probe(model, [[1, 2, 3], [4, 5, 6]])


def test_negative_indices_count_from_the_end(model):
    assert probes.lens(model, TOKENS, position=-1).position == 5
    last = probes.attribute(model, TOKENS, position=-6)
    assert last.position == 0 and torch.isfinite(last.contributions).all()


def test_report_refuses_a_block_the_model_lacks(model, tmp_path):
    pytest.importorskip("matplotlib")
    from probes.report import build_report

    with pytest.raises(InputError, match="block 5 is out of range"):
        build_report(model, TOKENS, tmp_path / "out", block=5, progress=lambda _: None)
