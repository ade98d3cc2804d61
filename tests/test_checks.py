"""minigpt.checks: each helper returns what it accepts and refuses the rest with the caller's error class,
naming the value, the valid range and the way out."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from minigpt.checks import (UNSET, check_bool, check_choice, check_device, check_float, check_floating_dtype,
                            check_int, renamed_keyword)
from minigpt.errors import HarvestError, InputError, TrainingError


def test_check_bool_takes_only_true_and_false() -> None:
    assert check_bool(True, "grad") is True and check_bool(False, "grad") is False
    for bad in (1, 0, None, "yes"):
        with pytest.raises(InputError, match=f"grad must be True or False, got {bad!r}"):
            check_bool(bad, "grad")
    with pytest.raises(HarvestError, match="--resume must be True or False"):
        check_bool(1, "--resume", error=HarvestError)


def test_check_int_bounds_are_inclusive_and_open_when_none() -> None:
    assert check_int(0, "seed", 0, 5) == 0 and check_int(5, "seed", 0, 5) == 5
    assert check_int(-10**30, "offset") == -10**30
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 5\], got 6"):
        check_int(6, "seed", 0, 5)
    with pytest.raises(InputError, match=r"--batch-size must be an integer >= 1, got 0; use e\.g\. 8"):
        check_int(0, "--batch-size", 1, way_out="use e.g. 8")
    with pytest.raises(InputError, match=r"k must be an integer <= 3, got 4"):
        check_int(4, "k", high=3)
    for bad in (True, 2.0, "3", None):  # a bool is an int to Python, never a count to us
        with pytest.raises(TrainingError, match="must be an integer"):
            check_int(bad, "steps", 1, error=TrainingError)


def test_check_float_wants_a_finite_real_in_range() -> None:
    assert check_float(3, "lr", 0) == 3.0 and isinstance(check_float(3, "lr", 0), float)
    assert check_float(0.5, "p", 0, 1) == 0.5
    for bad in (math.nan, math.inf, -math.inf, True, "0.1", None, 1.5):
        with pytest.raises(InputError, match=rf"p must be a finite number in \[0, 1\], got {bad!r}"):
            check_float(bad, "p", 0, 1)
    with pytest.raises(TrainingError, match=r"--lr must be a finite number >= 0, got -1; e\.g\. --lr 3e-4"):
        check_float(-1, "--lr", low=0, way_out="e.g. --lr 3e-4", error=TrainingError)


def test_check_choice_lists_the_choices_and_the_closest() -> None:
    assert check_choice("last", "keep", ["all", "last"]) == "last"
    with pytest.raises(InputError, match=r"keep must be one of 'all', 'last', got 'lats'; did you mean 'last'\?"):
        check_choice("lats", "keep", ["all", "last"])
    with pytest.raises(InputError, match="got True"):  # True == 1, but it is not the choice 1
        check_choice(True, "level", [0, 1, 2])


def test_check_device_gives_a_device_and_names_the_option() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu"), "to") == torch.device("cpu")
    with pytest.raises(InputError, match=r"to='gpu0' is not a device .*use e\.g\. 'cpu' or 'cuda:0'"):
        check_device("gpu0", "to")
    with pytest.raises(HarvestError, match=r"device=\[1\] is not a device"):
        check_device([1], error=HarvestError)


def test_check_floating_dtype_and_its_size() -> None:
    assert check_floating_dtype(torch.bfloat16, "store_dtype", "use a float") is torch.bfloat16
    for bad in (torch.int8, torch.bool, "float32", None):
        with pytest.raises(InputError, match=f"store_dtype={bad!r} is not a floating dtype; use a float"):
            check_floating_dtype(bad, "store_dtype", "use a float")
    with pytest.raises(InputError, match="is not a floating dtype of 16 bits or more; weights"):
        check_floating_dtype(torch.float8_e4m3fn, "dtype", "weights", min_bytes=2)


def test_renamed_keyword_maps_warns_and_refuses_both() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed_keyword(3, UNSET, ("new", "old")) == 3  # only the new one: no warning
        assert renamed_keyword(None, UNSET, ("new", "old")) is None
    with pytest.warns(DeprecationWarning, match="old= is renamed new="):
        assert renamed_keyword(None, 7, ("new", "old")) == 7
    with pytest.raises(InputError, match="old= and new= are the same option .*give only new="):
        renamed_keyword(1, 2, ("new", "old"))
    with pytest.raises(HarvestError):
        renamed_keyword(1, 2, ("new", "old"), error=HarvestError)
