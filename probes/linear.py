"""Linear probes, one per layer: how well a linear function of the activations predicts a label.

Plain torch. Classes (an integer label per row): multinomial logistic regression with an L2
penalty, fitted full-batch with L-BFGS. Scalars (a float per row): ridge regression, solved in
closed form. Features are standardised with the training rows' mean and std (the weights returned
are in the original units). Scores are on held-out rows: accuracy (with the majority-class
accuracy beside it, the score of a probe that learned nothing) or R^2.

The split: ``test_fraction`` of the rows, chosen by a generator seeded with ``seed``. With
``groups`` (e.g. each row's document from ``minigpt.harvest.read(...).document``) whole groups go
to one side, so that a probe is never tested on text it was trained on.

    from minigpt.harvest import read
    layers = {L: read("acts/", f"blocks.{L}.resid_post") for L in range(12)}
    starts_word = ...  # a label per row, from rows.token
    result = probes.linear.fit_per_layer(layers, starts_word, groups=layers[0].document)
    result.scores   # {layer: held-out accuracy}
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from minigpt.errors import InputError


@dataclass
class Probe:
    """One fitted probe. ``weight`` [D, C] (classes) or [D] (scalar), ``bias`` [C] or []: a row x [D]
    predicts ``x @ weight + bias`` (logits, or the value)."""
    kind: str            # "classes" or "scalar"
    weight: torch.Tensor
    bias: torch.Tensor
    score: float         # held-out accuracy or R^2
    train_score: float
    baseline: float      # held-out accuracy of always answering the training set's commonest class; 0 for R^2

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> predicted class [N] or value [N]."""
        out = x.to(self.weight.dtype) @ self.weight + self.bias
        return out.argmax(-1) if self.kind == "classes" else out


@dataclass
class LayerProbes:
    """A probe per layer, fitted on the same split."""
    kind: str
    metric: str                      # "accuracy" or "R^2"
    probes: dict = field(default_factory=dict)   # layer -> Probe
    seed: int = 0
    test_fraction: float = 0.2
    n_train: int = 0
    n_test: int = 0

    @property
    def scores(self) -> dict:
        """Layer -> held-out score."""
        return {layer: p.score for layer, p in self.probes.items()}


def split(n: int, test_fraction: float = 0.2, seed: int = 0,
          groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, test rows): a seeded random ``test_fraction`` of the rows (of the groups, with ``groups`` [n])."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=generator)
        n_test = max(1, round(n * test_fraction))
        return order[n_test:].sort().values, order[:n_test].sort().values
    groups = torch.as_tensor(groups)
    if groups.shape != (n,):
        raise InputError(f"groups must hold one value per row: shape [{n}], got {list(groups.shape)}; give e.g. "
                         "rows.document (the same rows as the labels)")
    names = groups.unique()
    if len(names) < 2:
        raise InputError("groups must hold at least two different values to split on them")
    chosen = names[torch.randperm(len(names), generator=generator)[:max(1, round(len(names) * test_fraction))]]
    test = torch.isin(groups, chosen)
    return (~test).nonzero().flatten(), test.nonzero().flatten()


def fit(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, *, kind: str | None = None,
        l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """One probe on rows x [N, D] with labels y [N] (integers: classes; floats: a scalar), on the given split."""
    x = torch.as_tensor(x).reshape(len(x), -1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = torch.as_tensor(y)
    kind = kind or ("scalar" if y.is_floating_point() else "classes")
    if len(x) != len(y):
        raise InputError(f"{len(x)} rows but {len(y)} labels; give one label per row")
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-6)
    z_train, z_test = (x[train] - mean) / std, (x[test] - mean) / std
    if kind == "classes":
        w, b = _logistic(z_train, y[train].long(), l2, max_iter)
        accuracy = lambda z, t: ((z @ w + b).argmax(-1) == t).double().mean().item()  # noqa: E731
        commonest = y[train].long().bincount().argmax()
        score, train_score = accuracy(z_test, y[test].long()), accuracy(z_train, y[train].long())
        baseline = (y[test].long() == commonest).double().mean().item()
    elif kind == "scalar":
        w, b = _ridge(z_train, y[train].to(z_train.dtype), l2)
        score, train_score, baseline = _r2(z_test @ w + b, y[test]), _r2(z_train @ w + b, y[train]), 0.0
    else:
        raise InputError(f"kind must be 'classes' or 'scalar', got {kind!r}")
    # Back to the original units: (x - mean) / std @ w + b = x @ (w / std) + (b - mean / std @ w).
    weight = w / (std[:, None] if w.dim() == 2 else std)
    return Probe(kind, weight, b - (mean / std) @ w, score, train_score, baseline)


def fit_per_layer(layers: Mapping, y: torch.Tensor, *, kind: str | None = None, groups: torch.Tensor | None = None,
                  test_fraction: float = 0.2, seed: int = 0, l2: float = 1e-3, max_rows: int | None = None) -> LayerProbes:
    """A probe per layer on the same held-out split: ``layers`` maps a layer (name or number) to its rows
    [N, D] (a tensor, or harvest ``Rows``, read one layer at a time); ``y`` [N] the labels.

    ``max_rows``: use only the first that many rows (the same for every layer)."""
    y = torch.as_tensor(y)
    if y.dim() != 1:
        raise InputError(f"y must hold one label per row, shape [N], got shape {list(y.shape)}")
    # Checked before max_rows cuts them: rows and labels of different lengths are not the same rows.
    for layer, rows in layers.items():
        if len(rows) != len(y):
            raise InputError(f"layer {layer!r} has {len(rows)} rows but y has {len(y)} labels; give one label per row")
    if groups is not None and torch.as_tensor(groups).shape != y.shape:
        raise InputError(f"groups has shape {list(torch.as_tensor(groups).shape)} but y {list(y.shape)}; give one "
                         "group per row")
    n = len(y) if max_rows is None else min(len(y), max_rows)
    y = y[:n]
    train, test = split(n, test_fraction, seed, None if groups is None else torch.as_tensor(groups)[:n])
    result = LayerProbes(kind="", metric="", seed=seed, test_fraction=test_fraction, n_train=len(train),
                         n_test=len(test))
    for layer, rows in layers.items():
        result.probes[layer] = fit(rows[:n], y, train, test, kind=kind, l2=l2)  # Rows read only these rows
    first = next(iter(result.probes.values()))
    result.kind, result.metric = first.kind, "accuracy" if first.kind == "classes" else "R^2"
    return result


def _logistic(z: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2 * |W|^2, full batch L-BFGS."""
    classes = int(y.max()) + 1
    w = torch.zeros(z.shape[1], classes, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=z.dtype, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    return w.detach(), b.detach()


def _ridge(z: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression on centred targets: (Z'Z + l2 N I) w = Z'(y - mean y); the bias is y's mean."""
    n, d = z.shape
    w = torch.linalg.solve(z.T @ z + l2 * n * torch.eye(d, dtype=z.dtype), z.T @ (y - y.mean()))
    return w, y.mean()


def _r2(predicted: torch.Tensor, y: torch.Tensor) -> float:
    y = y.to(predicted.dtype)
    return (1 - (y - predicted).pow(2).sum() / (y - y.mean()).pow(2).sum().clamp_min(1e-12)).item()
