"""Sparse autoencoders on harvested rows: train (ReLU + L1, or top-k), measure, splice into a run, save for SAELens.

    from minigpt.harvest import read
    from probes.sae import SAE, SAESettings, train, measure, loss_recovered, splice

    rows = read("acts/", "blocks.3.resid_post")
    sae = train(rows, "sae/", SAESettings(d_sae=512, activation="topk", k=16, steps=2000))
    measure(sae, rows).l0; loss_recovered(model, sae, "blocks.3.resid_post", texts).recovered
    model.run(text, edits=splice(sae, "blocks.3.resid_post"))
    SAE.load("sae/")

The modules: model (the SAE, its initialisation and files), settings, loop (the training loop, one step,
the auxiliary loss), checkpoint (resuming, metrics.jsonl), measure (L0, explained variance, dead and
dense latents, loss recovered, top activations), splice (the SAE as an edit).
"""
from .measure import Recovered, Stats, context, loss_recovered, measure, top_activations
from .model import SAE, geometric_median
from .settings import SAESettings
from .splice import splice
from .loop import train

__all__ = ["SAE", "SAESettings", "train", "measure", "Stats", "loss_recovered", "Recovered", "splice",
           "top_activations", "context", "geometric_median"]
