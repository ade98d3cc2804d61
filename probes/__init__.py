"""Probes: every experiment of the lecture notes (docs/NOTES.md) as one call on top of minigpt's taps.

Each probe takes a model and one text (or token ids), returns a dataclass of tensors, floats and
strings, with ``findings`` (the notes' claims, checked) and a one-paragraph ``verdict``; none
plots. ``probes.plots`` turns the data into matplotlib figures; ``probes.report`` runs them all.
"""
from ._common import Finding, Result
from .attribution import Attribution, attribute
from .distributions import Distributions, measure_distributions
from .final_norm import FinalNorm, check_final_norm
from .interventions import InterventionResult, Interventions, intervene
from .logit_lens import LogitLens, lens
from .reconstruction import Reconstruction, reconstruct

__all__ = ["Finding", "Result", "Reconstruction", "reconstruct", "FinalNorm", "check_final_norm", "Interventions",
           "InterventionResult", "intervene", "Distributions", "measure_distributions", "LogitLens", "lens",
           "Attribution", "attribute"]
