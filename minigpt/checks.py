"""Small typed checks that guard clauses are written with, so that every refusal reads alike.

Each helper takes the value, ``what`` (the name the caller knows it by: ``"grad"``, ``"seed"``,
``"--batch-size"``), the valid range where there is one, ``way_out`` (what to do instead, optional)
and ``error``: the calling module's error class (InputError by default; HarvestError,
TrainingError, CheckpointError, ... elsewhere). It returns the value when it is valid (as the type
said: ``check_device`` gives a ``torch.device``) and otherwise raises ``error`` with a message that
names the value, the valid range and the way out. A guard is then one line::

    seed = check_int(seed, "seed", 0, 2**63 - 1)
    rate = check_float(rate, "--lr", low=0, way_out="e.g. --lr 3e-4", error=TrainingError)

``renamed_keyword`` maps a deprecated keyword onto the one that replaced it.
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Iterable

import numpy
import torch

from .errors import InputError, MiniGPTError, closest

ErrorClass = type[MiniGPTError]
# NumPy's bool is no more an integer than Python's.
_NUMPY_BOOL = numpy.bool_


def _then(way_out: str) -> str:
    return f"; {way_out}" if way_out else ""


def _span(low: float | None, high: float | None) -> str:
    """' in [low, high]', ' >= low', ' <= high' or '' (a bound None is open)."""
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def is_integer(value: object) -> bool:
    """An integer that is not a bool: a Python int, or any ``numbers.Integral`` (NumPy's ``int64``, ...).

    ``True`` is an int to Python (and ``numpy.bool_`` an integer to some code), never a size or an
    index to us; a float, even ``2.0``, is not an integer.
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, _NUMPY_BOOL))


def check_bool(value: object, what: str, *, error: ErrorClass = InputError) -> bool:
    """``value`` if it is True or False (not 1, 0, None or a string)."""
    if not isinstance(value, bool):
        raise error(f"{what} must be True or False, got {value!r}")
    return value


def check_int(value: object, what: str, low: int | None = None, high: int | None = None, *,
              way_out: str = "", error: ErrorClass = InputError) -> int:
    """``value`` as a Python int if it is an integer (``is_integer``: not a bool, not a float) with ``low <= value <= high``; a bound None is open."""
    if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{what} must be an integer{_span(low, high)}, got {value!r}{_then(way_out)}")
    return operator.index(value)  # a Python int: NumPy's would not go into JSON, nor compare as one


def check_float(value: object, what: str, low: float | None = None, high: float | None = None, *,
                way_out: str = "", error: ErrorClass = InputError) -> float:
    """``value`` as a float if it is a finite real number (an int or a float, NumPy's too, not a bool) in [low, high]."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, (bool, _NUMPY_BOOL)) and math.isfinite(value)
            and (low is None or value >= low) and (high is None or value <= high)):
        raise error(f"{what} must be a finite number{_span(low, high)}, got {value!r}{_then(way_out)}")
    return float(value)


def check_choice(value: object, what: str, choices: Iterable[object], *, error: ErrorClass = InputError) -> object:
    """``value`` if it is one of ``choices``; the message lists them (and the closest, for a misspelt name)."""
    choices = list(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        near = closest(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        raise error(f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{near}")
    return value


def check_device(value: object, what: str = "device", *, error: ErrorClass = InputError) -> torch.device:
    """``value`` (a torch.device, ``'cpu'``, ``'cuda:0'``, an index, ...) as a ``torch.device``.

    Only the spelling is checked; whether this machine has that device is ``inputs.check_placement``'s question.
    """
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise error(f"{what}={value!r} is not a device ({e}); use e.g. 'cpu' or 'cuda:0'") from None


def check_floating_dtype(value: object, what: str, way_out: str, *, min_bytes: int = 1,
                         error: ErrorClass = InputError) -> torch.dtype:
    """``value`` if it is a floating torch dtype of at least ``min_bytes`` bytes per value (2 leaves out float8)."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point and value.itemsize >= min_bytes):
        size = f" of {8 * min_bytes} bits or more" if min_bytes > 1 else ""
        raise error(f"{what}={value!r} is not a floating dtype{size}; {way_out}")
    return value


# The default of a deprecated keyword: tells "not given" apart from every value a caller could pass.
UNSET: object = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


def renamed_keyword(new: object, old: object, names: tuple[str, str], *, error: ErrorClass = InputError) -> object:
    """The value of a keyword renamed from ``names[1]`` to ``names[0]``: ``new``, or ``old`` if that was given.

    For the public function that takes both (``old`` defaulting to ``UNSET``, ``new`` to None) and
    calls this directly: the DeprecationWarning points at its caller. Both given: ``error``.
    """
    if old is UNSET:
        return new
    new_name, old_name = names
    if new is not None:
        raise error(f"{old_name}= and {new_name}= are the same option ({old_name}= is its old name); give only "
                    f"{new_name}=")
    warnings.warn(f"the keyword {old_name}= is renamed {new_name}=; {old_name}= still works for now but will go",
                  DeprecationWarning, stacklevel=3)
    return old
