"""What one run recorded: a read-only mapping from tap name to tensor."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .errors import TapError, closest


class Trace(Mapping[str, torch.Tensor]):
    """Read-only mapping from tap name to the tensor recorded in one call."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_layer: int, mask: torch.Tensor | None = None):
        self._tensors = dict(tensors)
        self.n_layer = n_layer
        self.mask = mask  # [B, S] bool, True = real token (a padded batch has False after each row's tokens)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise TapError(f"tap {name!r} was not recorded in this run{closest(name, self._tensors)}; "
                           f"ask for it with run(..., taps=[{name!r}])") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Trace({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self._tensors.items())})"

    def stack(self, tap: str) -> torch.Tensor:
        """One block tap across all blocks: ``stack('resid_post')`` -> [n_layer, *shape]."""
        return torch.stack([self[f"blocks.{layer}.{tap}"] for layer in range(self.n_layer)])

    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        """What HuggingFace's ``output_hidden_states=True`` returns: n_layer + 1 tensors [B, S, D].

        Block 0's input, the output of every block but the last, then ``ln_f`` (so the last one is
        normalised, unlike ``blocks.{last}.resid_post``). A block's output is ``blocks.L.resid_post``,
        or where that was not recorded ``blocks.L+1.resid_pre``: the same tensor unless an edit
        changed that block input. Record ``taps=['blocks.*.resid_pre', 'ln_f']`` (or ``resid_post``).
        """
        states, missing = [], []
        for options in [["blocks.0.resid_pre"]] + [
                [f"blocks.{layer}.resid_post", f"blocks.{layer + 1}.resid_pre"] for layer in range(self.n_layer - 1)
        ] + [["ln_f"]]:
            found = next((self._tensors[n] for n in options if n in self._tensors), None)
            states.append(found)
            if found is None:
                missing.append(options[-1])
        if missing:
            raise TapError(f"hidden_states() needs taps {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                           "run with taps=['blocks.*.resid_pre', 'ln_f']")
        return tuple(states)
