"""Probes: every experiment of the lecture notes (docs/NOTES.md) as one call on top of minigpt's taps.

Each probe takes a model and one text (or token ids), returns a dataclass of tensors, floats and
strings, with ``findings`` (the notes' claims, checked) and a one-paragraph ``verdict``; none
plots. ``probes.plots`` turns the data into matplotlib figures; ``probes.report`` runs them all.
Beyond the notes: ``induction_scores`` (with ``induction_findings``), ``attention_sink`` (the first token's
attention and residual norm) and ``path_patch``/``path_patch_sweep`` (circuit experiments),
``write_attention_view`` (an interactive, offline page of a run's attention).
"""
from ._common import Finding, Result
from .attention_view import write_attention_view
from .attribution import Attribution, attribute
from .distributions import Distributions, measure_distributions
from .final_norm import FinalNorm, check_final_norm
from .induction import Induction, induction_findings, induction_scores
from .interventions import InterventionResult, Interventions, intervene
from .logit_lens import LogitLens, lens
from .path_patching import logit_difference, path_patch, path_patch_sweep
from .reconstruction import Reconstruction, reconstruct
from .sink import AttentionSink, attention_sink

__all__ = ["Finding", "Result", "Reconstruction", "reconstruct", "FinalNorm", "check_final_norm", "Interventions",
           "InterventionResult", "intervene", "Distributions", "measure_distributions", "LogitLens", "lens",
           "Attribution", "attribute", "Induction", "induction_scores", "induction_findings",
           "AttentionSink", "attention_sink", "path_patch", "path_patch_sweep",
           "logit_difference", "write_attention_view"]
