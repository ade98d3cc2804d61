"""Every finding marked "needs trained weights" must NOT hold on random weights of the same shape.

A claim that random weights already show says nothing about training: it is either re-thought (a
statistic that separates trained from random weights, measured on both: the numbers are beside each
finding in probes/) or relabelled as architectural. Checked over several seeds for the shipped models'
shapes (docs-small: 6 blocks, d_model 192, 6 heads; pydoc-tiny: 8 blocks, d_model 64, 4 heads) and GPT-2
small's (12 blocks, 768; a short text and two seeds, as a random GPT-2 small costs seconds on a CPU).
"""
from __future__ import annotations

import pytest

import probes
from minigpt import GPT, GPTConfig
from probes._common import Finding

TEXT = ("The open() function opens a file and returns a file object. The mode argument is a string that says "
        "how the file is to be opened: 'r' for reading, 'w' for writing and 'a' for appending.")
SHORT = "The open() function opens a file and returns a file object. The mode"  # 15 tokens
TINY = GPTConfig(vocab_size=50257, n_positions=256, n_embd=64, n_layer=8, n_head=4)  # pydoc-tiny's
DOCS_SMALL = GPTConfig(vocab_size=50257, n_positions=256, n_embd=192, n_layer=6, n_head=6)


def trained_claims(model: GPT, text: str) -> dict[str, Finding]:
    """Every probe's findings that need trained weights, by report key (section.key)."""
    found = {}
    for section, result in (("reconstruction", probes.reconstruct(model, text)),
                            ("distributions", probes.measure_distributions(model, text)),
                            ("logit_lens", probes.lens(model, text)), ("attribution", probes.attribute(model, text)),
                            ("attention_sink", probes.attention_sink(model, text)),
                            ("induction", probes.induction_findings(probes.induction_scores(model, n=20, batch=2)))):
        findings = result if isinstance(result, list) else result.findings
        found.update({f"{section}.{x.key}": x for x in findings if x.needs_trained})
    for item in probes.intervene(model, text).results:
        found.update({f"interventions.{item.name}.{x.key}": x for x in item.findings if x.needs_trained})
    return found


def assert_none_holds(found: dict[str, Finding]) -> None:
    holding = {key: x.detail for key, x in found.items() if x.holds is True}
    assert not holding, f"needs-trained findings that hold on random weights: {holding}"


@pytest.mark.parametrize("shape", [DOCS_SMALL, TINY], ids=["docs-small", "pydoc-tiny"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_trained_finding_holds_on_random_weights_of_the_shipped_shapes(shape: GPTConfig, seed: int) -> None:
    found = trained_claims(GPT.random(shape, seed=seed), TEXT)
    assert {"reconstruction.near_line", "interventions.scale_0.1.later_blocks", "distributions.tails",
            "interventions.mlp_noise.slightly_negative", "induction.heads", "attention_sink.sink"} <= set(found)
    assert_none_holds(found)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_no_trained_finding_holds_on_random_weights_of_gpt2_small_shape(seed: int) -> None:
    assert_none_holds(trained_claims(GPT.random("gpt2", seed=seed), SHORT))


def test_relabelled_findings_are_architectural() -> None:
    """The claims that random weights show are not marked as needing trained weights."""
    model = GPT.random(TINY, seed=0)
    d = {x.key: x for x in probes.measure_distributions(model, TEXT).findings}
    assert d["gradual"].holds is True and not d["gradual"].needs_trained
    noise = {x.key: x for x in probes.intervene(model, TEXT)["mlp_noise"].findings}
    assert noise["out_of_distribution"].holds is True and not noise["out_of_distribution"].needs_trained


def test_a_claim_without_a_later_block_is_not_testable() -> None:
    """Editing the last block leaves no later block to compensate: 'not testable', neither holds nor fails."""
    model = GPT.random(GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2), seed=0)
    later = {x.key: x for x in probes.intervene(model, list(range(10)), block=1)["scale_0.1"].findings}["later_blocks"]
    assert later.holds is None and later.testable is False and later.mark == "not testable"
    assert "not testable on this model" in later.detail and "last block" in later.detail


def claims(model: GPT, text: str) -> dict[str, str]:
    """Every probe's claim texts by key (the interventions' by edit and key)."""
    found = {f"{probe.__name__}.{x.key}": x.claim for probe in (probes.reconstruct, probes.check_final_norm,
                                                                probes.measure_distributions, probes.lens,
                                                                probes.attribute, probes.attention_sink)
             for x in probe(model, text).findings}
    found.update({f"{item.name}.{x.key}": x.claim for item in probes.intervene(model, text).results
                  for x in item.findings})
    return found


def test_claim_texts_name_no_token_block_or_head() -> None:
    """The claim (the compare table's one column for all runs) is the same whatever the run predicts and
    whatever its shape: the token, block and head go in the detail."""
    other = GPT.random(GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=5, n_head=2), seed=1)
    assert claims(GPT.random(TINY, seed=0), TEXT) == claims(other, SHORT)
