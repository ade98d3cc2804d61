"""The sparse autoencoder: encode, decode, its initialisation, and its files in SAELens's layout.

``x [N, d_in] -> latents z = act((x - b_dec) @ W_enc + b_enc) [N, d_sae] -> z @ W_dec + b_dec [N, d_in]``,
with ``act`` a ReLU ("relu", trained with an L1 penalty) or "topk": each row keeps its k largest
pre-activations (then a ReLU) and zeroes the rest. A directory holds ``sae_weights.safetensors``
(``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]) and ``cfg.json``,
the fields SAELens reads (``sae_lens.SAE.load_from_disk(dir)`` loads it; tested where SAELens is installed).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt.checks import check_choice, check_int
from minigpt.config import DTYPES
from minigpt.errors import CheckpointError, InputError
from minigpt.files import checked_file, read_json, write_atomically, write_json

ACTIVATIONS = ("relu", "topk")
WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
LOAD_WAY_OUT = "give a directory written by SAE.save (or train)"


class SAE(torch.nn.Module):
    """A sparse autoencoder on rows of ``d_in`` values (a tap's trailing axes, flattened).

    ``activation``: "relu" or "topk" (``k`` latents per row). ``hook_name``: the tap it was trained
    on (``blocks.3.resid_post``); ``row_shape``: that tap's trailing shape (default ``(d_in,)``);
    ``model_name``: the model's name or provenance. Parameters as in the module docstring; the
    rows of ``W_dec`` are each latent's direction (unit norm after ``initialise`` and every step).
    """

    def __init__(self, d_in: int, d_sae: int, activation: str = "relu", k: int | None = None, *,
                 hook_name: str = "", model_name: str = "", row_shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        check_int(d_in, "d_in", 1)
        check_int(d_sae, "d_sae", 1)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        if activation == "topk":
            check_int(k, "k", 1, d_sae, way_out="give how many latents each row keeps")
        elif k is not None:
            raise InputError(f"k={k!r} is for activation='topk' only; with 'relu' leave it out")
        self.row_shape = tuple(row_shape) if row_shape is not None else (d_in,)
        if math.prod(self.row_shape) != d_in:
            raise InputError(f"row_shape {self.row_shape} holds {math.prod(self.row_shape)} values, not d_in={d_in}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.hook_name, self.model_name = hook_name, model_name
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> (x - b_dec) @ W_enc + b_enc [..., d_sae] (b_dec subtracted before encoding)."""
        centred = x.to(self.dtype) - self.b_dec
        rows = torch.addmm(self.b_enc, centred.reshape(-1, self.d_in), self.W_enc)  # the bias added in the matmul
        return rows.reshape(*centred.shape[:-1], self.d_sae)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., d_sae] -> latents [..., d_sae]: ReLU, or each row's top k then ReLU."""
        if self.activation == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> latents [..., d_sae] (in the SAE's dtype)."""
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents [..., d_sae] -> reconstruction z @ W_dec + b_dec [..., d_in]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> its reconstruction [..., d_in]."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, *, seed: int = 0, b_dec_init: str = "geometric_median") -> SAE:
        """W_dec: random unit rows (seeded), W_enc = W_dec.T, b_enc = 0, b_dec the geometric median
        (or the mean) of ``sample`` [n, d_in]. Returns self."""
        check_choice(b_dec_init, "b_dec_init", ("geometric_median", "mean"))
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float64)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec.copy_(directions)
        self.W_enc.copy_(directions.T)
        self.b_enc.zero_()
        sample = sample.reshape(len(sample), self.d_in).double()
        self.b_dec.copy_(geometric_median(sample) if b_dec_init == "geometric_median" else sample.mean(0))
        return self

    def config(self) -> dict:
        """cfg.json's fields: SAELens's (pre-6.0 flat layout, which it converts on load) and minigpt's row_shape."""
        return {"architecture": "topk" if self.activation == "topk" else "standard", "d_in": self.d_in,
                "d_sae": self.d_sae, "dtype": str(self.dtype).removeprefix("torch."), "device": "cpu",
                "hook_name": self.hook_name, "hook_head_index": None, "model_name": self.model_name,
                "activation_fn": self.activation,
                "activation_fn_kwargs": {"k": self.k} if self.activation == "topk" else {},
                "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                "prepend_bos": False, "row_shape": list(self.row_shape)}

    def save(self, directory: str | Path) -> Path:
        """Write ``sae_weights.safetensors`` then ``cfg.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in PARAMETERS}
        write_atomically(directory / WEIGHTS_FILE, lambda temporary: save_file(tensors, temporary))
        write_json(directory / CONFIG_FILE, self.config())
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> SAE:
        """The SAE saved in ``directory`` (CheckpointError if it is missing, damaged or inconsistent)."""
        directory = Path(directory)
        cfg = read_json(checked_file(directory / CONFIG_FILE, directory, CheckpointError, what="SAE",
                                     way_out=LOAD_WAY_OUT), CheckpointError, LOAD_WAY_OUT)
        try:
            sae = cls(**_arguments(cfg, directory), device=device)
        except (InputError, TypeError, ValueError) as e:  # sizes, shapes or an activation out of range
            raise CheckpointError(f"{directory / CONFIG_FILE}: {e}; {LOAD_WAY_OUT}") from None
        path = checked_file(directory / WEIGHTS_FILE, directory, CheckpointError, what="SAE", way_out=LOAD_WAY_OUT)
        try:
            tensors = load_file(str(path))
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); {LOAD_WAY_OUT}") from None
        for name in PARAMETERS:
            wanted = getattr(sae, name)
            if name not in tensors or tensors[name].shape != wanted.shape:
                found = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise CheckpointError(f"{path} holds {found} for {name}, but cfg.json asks for {tuple(wanted.shape)}; "
                                      f"the files do not belong together: {LOAD_WAY_OUT}")
            wanted.data.copy_(tensors[name])
        return sae


def _arguments(cfg: object, directory: Path) -> dict:
    """SAE(...)'s arguments from a cfg.json, checked."""
    try:
        dtype = DTYPES[cfg["dtype"]]
        kwargs = cfg.get("activation_fn_kwargs") or {}
        arguments = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "activation": cfg["activation_fn"],
                     "k": kwargs.get("k"), "hook_name": cfg.get("hook_name", ""),
                     "model_name": cfg.get("model_name", ""), "row_shape": cfg.get("row_shape"), "dtype": dtype}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not an SAE config (missing or malformed {e}); "
                              f"{LOAD_WAY_OUT}") from None
    if cfg.get("normalize_activations", "none") != "none" or not cfg.get("apply_b_dec_to_input", True):
        raise CheckpointError(f"{directory / CONFIG_FILE} asks for normalize_activations="
                              f"{cfg.get('normalize_activations')!r}, apply_b_dec_to_input="
                              f"{cfg.get('apply_b_dec_to_input')!r}; minigpt's SAE is 'none' and true only")
    return arguments


def geometric_median(points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-7) -> torch.Tensor:
    """points [n, d] -> the point [d] with the least sum of distances to them (Weiszfeld's iterations from the mean)."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-12)  # a point on the median must not divide by 0
        moved = (weights[:, None] * points).sum(0) / weights.sum()
        done = (moved - median).norm() <= tolerance * max(moved.norm().item(), 1.0)
        median = moved
        if done:
            break
    return median
