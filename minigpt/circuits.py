"""Attention heads' circuits as factored matrices: a product A @ B kept as its two factors.

A head's OV circuit ``W_V[l, h] @ W_O[l, h]`` is a D x D matrix of rank d; its full OV circuit
``W_E @ W_V @ W_O @ W_U`` is V x V (2.5 billion numbers for GPT-2). ``FactoredMatrix`` keeps such a
product as A [..., m, k] and B [..., k, n] and answers the questions asked of it (norm, singular
values, eigenvalues, products with other matrices) through the small k x k side, building the
m x n matrix only when ``.full()`` is called, and refusing that above a memory bound.
Shapes: L n_layer, H heads, D d_model, d d_head, V vocabulary.
"""
from __future__ import annotations

import torch

from .checks import check_int, is_integer
from .errors import InputError
from .weight_views import W_E, W_K, W_O, W_Q, W_U, W_V, Model, check_model

# Above this many bytes, building a product whole (.full(), the full OV circuit's factors) is refused.
MAX_FULL_BYTES = 2**30


def _check_bytes(nbytes: int, what: str, max_bytes: int | None) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` over ``max_bytes`` (None: no bound)."""
    if max_bytes is not None and nbytes > check_int(max_bytes, "max_bytes", 0, way_out="or None for no bound"):
        raise InputError(f"{what} would take {nbytes / 2**30:.2f} GiB ({nbytes:,} bytes), over max_bytes="
                         f"{max_bytes:,}; index one layer and head first, keep it factored, or pass a larger "
                         "max_bytes (None: no bound)")


class FactoredMatrix:
    """The matrix A @ B [..., m, n] held as A [..., m, k] and B [..., k, n]; leading (batch) dims broadcast.

    ``fm[l, h]`` indexes the batch dims; ``fm @ x`` and ``x @ fm`` stay factored when x is a matrix
    (a tensor [..., n, p] / [..., p, m], or another FactoredMatrix) and give a tensor for a vector;
    ``.T`` transposes; ``.full()`` builds A @ B.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.ndim >= 2 and B.ndim >= 2):
            raise InputError("FactoredMatrix(A, B) needs two tensors of 2 or more dims (A [..., m, k], B [..., k, n]), "
                             f"got {_describe(A)} and {_describe(B)}")
        if A.shape[-1] != B.shape[-2] or A.dtype != B.dtype or A.device != B.device:
            raise InputError(f"FactoredMatrix(A, B): A {_describe(A)} and B {_describe(B)} must share the inner "
                             "dim (A [..., m, k], B [..., k, n]), the dtype and the device")
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise InputError(f"FactoredMatrix(A, B): the leading dims of A {tuple(A.shape)} and B {tuple(B.shape)} "
                             "do not broadcast") from None
        # Broadcast once (views, no copy), so that indexing and the k x k algebra see one batch shape.
        self.A, self.B = A.expand(*batch, *A.shape[-2:]), B.expand(*batch, *B.shape[-2:])

    @property
    def shape(self) -> torch.Size:
        """[..., m, n], the shape of A @ B."""
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def ndim(self) -> int:
        return self.A.ndim

    @property
    def inner(self) -> int:
        """k, the dimension the product goes through (A @ B has rank <= k)."""
        return self.A.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def full_bytes(self) -> int:
        """The bytes ``.full()`` would allocate."""
        return self.shape.numel() * self.A.element_size()

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={list(self.shape)}, inner={self.inner}, dtype={self.dtype})"

    def full(self, max_bytes: int | None = MAX_FULL_BYTES) -> torch.Tensor:
        """A @ B [..., m, n], refused (InputError, with its size) over ``max_bytes`` (None: no bound)."""
        _check_bytes(self.full_bytes, f"the full {list(self.shape)} matrix", max_bytes)
        return self.A @ self.B

    @property
    def T(self) -> FactoredMatrix:
        """The transpose [..., n, m] = B^T @ A^T, still factored."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    @property
    def BA(self) -> torch.Tensor:
        """B @ A [..., k, k] (for a square A @ B): it has A @ B's nonzero eigenvalues."""
        return self.B @ self.A

    def rows(self, index: torch.Tensor | list[int] | int | slice) -> FactoredMatrix:
        """The rows ``index`` of A @ B [..., r, n] (ids [r], a list, a slice), still factored: A's rows only."""
        return FactoredMatrix(self.A[..., self._lines(index, -2), :], self.B)

    def columns(self, index: torch.Tensor | list[int] | int | slice) -> FactoredMatrix:
        """The columns ``index`` of A @ B [..., m, c], still factored: B's columns only."""
        return FactoredMatrix(self.A, self.B[..., self._lines(index, -1)])

    def _lines(self, index: object, dim: int) -> torch.Tensor | slice:
        """``index`` as rows/columns of dim ``dim`` (an int becomes a list, so that the dim stays), checked."""
        size = self.shape[dim]
        if isinstance(index, slice):
            return index
        if is_integer(index):
            index = [index]
        ids = torch.as_tensor(index) if isinstance(index, (list, tuple, torch.Tensor)) else None
        if ids is None or ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"rows and columns are picked by an int, a slice, or a 1-D list or tensor of ints, got "
                             f"{_describe(index)}")
        if ids.numel() and not (-size <= int(ids.min()) and int(ids.max()) < size):
            raise InputError(f"indices must be in [{-size}, {size - 1}] (that dim has {size}), got "
                             f"{int(ids.min())} to {int(ids.max())}")
        return ids.to(self.device)

    def __getitem__(self, index: int | slice | tuple) -> FactoredMatrix:
        """The batch dims indexed (ints and slices; the last two dims, m and n, cannot be indexed)."""
        parts = index if isinstance(index, tuple) else (index,)
        batch = self.ndim - 2
        if len(parts) > batch or not all(is_integer(p) or isinstance(p, slice) for p in parts):
            raise InputError(f"a FactoredMatrix of shape {list(self.shape)} is indexed on its {batch} leading dims "
                             f"with ints and slices, got {index!r}; use .full() (or a product) to reach entries")
        for dim, p in enumerate(parts):
            if is_integer(p) and not -self.A.shape[dim] <= p < self.A.shape[dim]:
                raise InputError(f"index {p} is out of range for dim {dim} of size {self.A.shape[dim]}")
        return FactoredMatrix(self.A[index], self.B[index])

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> torch.Tensor | FactoredMatrix:
        """(A @ B) @ other: factored for a matrix (keeping the smaller inner dim), a tensor [..., m] for a vector."""
        if isinstance(other, FactoredMatrix):
            self._check_tensor(other.A)
            self._check_operand(other.shape[-2], self.shape[-1], other, "right")
            middle = self.B @ other.A  # [..., k1, k2]
            if self.inner <= other.inner:
                return FactoredMatrix(self.A, middle @ other.B)
            return FactoredMatrix(self.A @ middle, other.B)
        other = self._check_tensor(other)
        self._check_operand(other.shape[0 if other.ndim == 1 else -2], self.shape[-1], other, "right")
        if other.ndim == 1:
            return (self.A @ (self.B @ other).unsqueeze(-1)).squeeze(-1)  # batched: keep [..., k] a column
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor | FactoredMatrix:
        """other @ (A @ B): factored for a matrix [..., p, m], a tensor [..., n] for a vector [m]."""
        other = self._check_tensor(other)
        self._check_operand(other.shape[-1], self.shape[-2], other, "left")
        if other.ndim == 1:
            return ((other @ self.A).unsqueeze(-2) @ self.B).squeeze(-2)
        return FactoredMatrix(other @ self.A, self.B)

    def _check_tensor(self, other: object) -> torch.Tensor:
        if not isinstance(other, torch.Tensor) or other.ndim == 0:
            raise InputError(f"a FactoredMatrix multiplies a tensor of 1 or more dims or a FactoredMatrix, got "
                             f"{_describe(other)}")
        if other.dtype != self.dtype or other.device != self.device:
            raise InputError(f"the operand ({other.dtype} on {other.device}) must have the FactoredMatrix's dtype "
                             f"and device ({self.dtype} on {self.device}); convert it with .to()")
        return other

    def _check_operand(self, size: int, want: int, other: object, side: str) -> None:
        if size != want:
            raise InputError(f"cannot multiply a FactoredMatrix of shape {list(self.shape)} by {_describe(other)} "
                             f"on the {side}: the dims that meet are {want} and {size}")

    def _cores(self) -> torch.Tensor:
        """R_A @ R_B^T [..., min(m, k), min(n, k)]: A @ B = Q_A (R_A R_B^T) Q_B^T with orthonormal Q's.

        So A @ B and this small matrix have the same nonzero singular values (and Frobenius norm).
        """
        r_a = torch.linalg.qr(self.A).R  # mode "reduced", not "r": that one has no gradient
        r_b = torch.linalg.qr(self.B.mT).R
        return r_a @ r_b.mT

    @property
    def singular_values(self) -> torch.Tensor:
        """[..., min(m, n, k)], descending: every singular value of A @ B that can be nonzero."""
        return torch.linalg.svdvals(self._cores())

    def norm(self) -> torch.Tensor:
        """The Frobenius norm of A @ B [...], computed through the k x k side."""
        return torch.linalg.matrix_norm(self._cores())

    @property
    def eigenvalues(self) -> torch.Tensor:
        """[..., min(m, k)] complex: A @ B's eigenvalues (square only), through the smaller of A @ B and B @ A.

        A @ B and B @ A have the same nonzero eigenvalues; when k < m, A @ B has m - k more, all zero,
        which are left out.
        """
        m, n = self.shape[-2:]
        if m != n:
            raise InputError(f"eigenvalues need a square matrix, this one is {list(self.shape)}")
        return torch.linalg.eigvals(self.BA if self.inner <= m else self.A @ self.B)


def _describe(value: object) -> str:
    if isinstance(value, (torch.Tensor, FactoredMatrix)):
        return f"{type(value).__name__} of shape {list(value.shape)}"
    return type(value).__name__


def ov_circuit(model: Model) -> FactoredMatrix:
    """Each head's OV circuit W_V @ W_O [L, H, D, D] (rank d): a residual vector x read by head h of layer l
    writes ``(x @ W_V[l, h]) @ W_O[l, h]``, weighted by the pattern. Biases are not part of it."""
    return FactoredMatrix(W_V(model), W_O(model))


def qk_circuit(model: Model) -> FactoredMatrix:
    """Each head's QK circuit W_Q @ W_K^T [L, H, D, D] (rank d): ``x_q @ QK[l, h] @ x_k^T`` is the score of query
    x_q for key x_k, before the model's scale (1/sqrt(d), and 1/(l+1) with scale_attn_by_inverse_layer_idx)
    and without the biases."""
    return FactoredMatrix(W_Q(model), W_K(model).mT)


def full_ov_circuit(model: Model, layer: int | None = None, head: int | None = None, *,
                    max_bytes: int | None = MAX_FULL_BYTES) -> FactoredMatrix:
    """W_E @ W_V @ W_O @ W_U, factored: [V, V] for one head, [H, V, V] for one layer, [L, H, V, V] for all.

    Entry (s, t): how much attending to token s raises the logit of token t through that head alone,
    LayerNorms aside (fold them in first with ``processing.fold_ln`` to make that closer to the model).
    The factors W_E @ W_V [..., V, d] and W_O @ W_U [..., d, V] are built; they are refused above
    ``max_bytes`` (InputError with their size); the V x V product itself is built only by ``.full()``.
    """
    cfg = check_model(model).cfg
    if layer is not None:
        check_int(layer, "layer", 0, cfg.n_layer - 1, way_out="or None for every layer")
    if head is not None:
        check_int(head, "head", 0, cfg.n_head - 1, way_out="or None for every head")
        if layer is None:
            raise InputError(f"head={head} needs a layer too; pass layer= (0 to {cfg.n_layer - 1})")
    heads = (1 if head is not None else cfg.n_head) * (1 if layer is not None else cfg.n_layer)
    itemsize = W_E(model).element_size()
    _check_bytes(2 * heads * cfg.vocab_size * cfg.d_head * itemsize, "the full OV circuit's two factors", max_bytes)
    w_v, w_o = (W_V(model, layer), W_O(model, layer)) if layer is not None else (W_V(model), W_O(model))
    if head is not None:
        w_v, w_o = w_v[head], w_o[head]
    return FactoredMatrix(W_E(model) @ w_v, w_o @ W_U(model))
