"""``SAESettings``: what an SAE training run is; a run resumed over the same directory must be given the same."""
from __future__ import annotations

from dataclasses import dataclass

from minigpt.checks import check_choice, check_float, check_int
from minigpt.errors import TrainingError

from .model import ACTIVATIONS


@dataclass(frozen=True)
class SAESettings:
    """An SAE training run, checked when built (TrainingError naming the field, its range and its value).

    d_sae: latents. activation: "relu" (sparsity from ``l1_coefficient`` x the latents' L1 norm) or
    "topk" (``k`` latents per row; ``l1_coefficient`` unused). steps of Adam (``lr``, ``beta1``,
    ``beta2``; linear warm-up over ``warmup`` steps, then constant) on batches of ``batch_size`` rows,
    every process together. Dead latents: a latent that fired on none of the last ``dead_after``
    tokens is dead; the auxiliary loss (``aux_k`` dead latents, weight ``aux_coefficient``; 0 turns it
    off) trains them on what the live ones miss. ``b_dec_init``: "geometric_median" or "mean" of the
    first ``init_rows`` rows of the shuffled order. ``seed``: the initial weights and the batch order.
    """

    d_sae: int = 512
    activation: str = "relu"
    k: int | None = None
    l1_coefficient: float = 1e-3
    aux_k: int = 32
    aux_coefficient: float = 1 / 32
    dead_after: int = 100_000
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: int = 0
    b_dec_init: str = "geometric_median"
    init_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        e = TrainingError
        check_int(self.d_sae, "d_sae", 1, error=e)
        check_choice(self.activation, "activation", ACTIVATIONS, error=e)
        if self.activation == "topk":
            check_int(self.k, "k", 1, self.d_sae, way_out="give k, the latents each row keeps", error=e)
        elif self.k is not None:
            raise TrainingError(f"k={self.k!r} is for activation='topk' only; with 'relu' leave it None")
        check_float(self.l1_coefficient, "l1_coefficient", 0, error=e)
        check_int(self.aux_k, "aux_k", 1, self.d_sae, error=e)
        check_float(self.aux_coefficient, "aux_coefficient", 0, way_out="0 turns the auxiliary loss off", error=e)
        for name in ("dead_after", "steps", "batch_size", "init_rows"):
            check_int(getattr(self, name), name, 1, error=e)
        check_float(self.lr, "lr", 0, error=e)
        check_float(self.beta1, "beta1", 0, 0.999999, error=e)
        check_float(self.beta2, "beta2", 0, 0.999999, error=e)
        check_int(self.warmup, "warmup", 0, error=e)
        check_choice(self.b_dec_init, "b_dec_init", ("geometric_median", "mean"), error=e)
        check_int(self.seed, "seed", 0, 2**63 - 1, error=e)

    def learning_rate(self, step: int) -> float:
        """``lr`` after a linear warm-up (reached at step ``warmup - 1``)."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr
