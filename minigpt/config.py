"""GPT-2 hyper-parameters, read from a HuggingFace ``config.json``, and the few facts shared package-wide."""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .checks import is_integer
from .errors import CheckpointError, InputError, MiniGPTError
from .files import read_json

# HF activation_function name -> the function. gelu_new is GPT-2's (tanh approximation).
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

# Floating dtypes by the names the command line and JSON files use.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# GPT-2's end-of-text token: it ends every document, and generation may stop at it.
END_OF_TEXT, END_OF_TEXT_ID = "<|endoftext|>", 50256
# The best trained model that ships with minigpt (minigpt/assets), what commands fall back to offline.
OFFLINE_MODEL = "docs-small"


@dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a GPT-2 model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (not is_integer(self.n_inner) or self.n_inner < 1):
            problems.append(f"n_inner must be a positive integer or null, got {self.n_inner!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
                problems.append(f"{name} must be a probability in [0, 1], got {value!r}")
        if not isinstance(self.scale_attn_by_inverse_layer_idx, bool):
            problems.append(f"scale_attn_by_inverse_layer_idx must be true or false, "
                            f"got {self.scale_attn_by_inverse_layer_idx!r}")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            problems.append(f"activation_function {self.activation_function!r} is not supported "
                            f"(supported: {', '.join(ACTIVATIONS)})")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and not isinstance(self.layer_norm_epsilon, bool)
                and math.isfinite(self.layer_norm_epsilon)
                and self.layer_norm_epsilon > 0):
            problems.append(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if problems:
            raise CheckpointError("bad GPT-2 config: " + "; ".join(problems)
                                  + ". Fix config.json (or the GPTConfig arguments)")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict) -> GPTConfig:
        """Read a HuggingFace GPT-2 ``config.json`` (as a dict); refuse anything that is not GPT-2."""
        if not isinstance(hf, dict):
            raise CheckpointError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise CheckpointError(f"config.json says model_type={model_type!r}; minigpt runs GPT-2 "
                                  "checkpoints only (model_type 'gpt2'). Load other architectures with the "
                                  "library made for them (e.g. transformers)")
        # Options of HF's GPT-2 that change the maths minigpt implements: refuse rather than differ.
        unsupported = {"scale_attn_weights": False, "add_cross_attention": True}
        changed = [f"{k}={hf[k]!r}" for k, v in unsupported.items() if k in hf and hf[k] == v]
        if changed:
            raise CheckpointError(f"config.json sets {', '.join(changed)}; minigpt implements standard GPT-2 "
                                  "only (scaled self-attention, no cross-attention): use transformers for this model")
        if hf.get("tie_word_embeddings", True) is False:
            raise CheckpointError("config.json unties the unembedding (tie_word_embeddings=false); "
                                  "GPT-2 ties it to the token embedding and so does minigpt")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in known})

    def to_hf(self) -> dict:
        """The ``config.json`` dict HuggingFace would write for this shape."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": self.n_positions,
                **asdict(self)}


# The official OpenAI sizes (and distilgpt2), for random-weight stand-ins when offline.
OFFICIAL = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPTConfig(n_layer=6),
}


def config_of(size: str | GPTConfig | Path, error: type[MiniGPTError] = InputError, option: str = "size") -> GPTConfig:
    """An official size's config, a GPTConfig as it is, or one read from a config.json (HF's or GPTConfig's
    own fields: then an unknown field is refused, so no typo passes). ``error``/``option``: what to raise,
    and the option to name, when ``size`` is neither."""
    if isinstance(size, GPTConfig):
        return size
    if isinstance(size, str) and size in OFFICIAL:
        return OFFICIAL[size]
    path = Path(size)
    if not path.is_file():
        raise error(f"{option} {size!r} is neither an official size ({', '.join(OFFICIAL)}) nor a config.json file")
    raw = read_json(path, error, "give a config.json: HF's, or one of GPTConfig's fields")
    if isinstance(raw, dict) and "model_type" not in raw:
        unknown = sorted(set(raw) - {f.name for f in fields(GPTConfig)} - {"n_ctx"})
        if unknown:
            raise error(f"{path} has fields GPT-2's config does not know: {', '.join(unknown)} (known: "
                        f"{', '.join(f.name for f in fields(GPTConfig))}); or give an HF config.json")
        raw = {"model_type": "gpt2", **raw}
    return GPTConfig.from_hf(raw)
