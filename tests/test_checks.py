"""calmwild.checks: one rule per check, one line naming the argument, the rule and the value."""

import pytest
import torch

from calmwild.checks import (
    WrongType,
    check_choice,
    check_count,
    check_open_unit,
    check_optional_count,
    check_positive,
    check_sigmas,
    check_subset,
    sigma_key,
)
from calmwild.settings import PerSigmaSettings


def test_sigma_naming_and_validation():
    assert [sigma_key(s) for s in (80.0, 0.5943, 0.002, 12.912)] == ["sigma_80", "sigma_0.594", "sigma_0.002",
                                                                       "sigma_12.9"]
    default = PerSigmaSettings().sigma_list()
    assert len(default) == 18 and default[0] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="distinct at 3 significant digits"):
        check_sigmas([1.0001, 1.0002], distinct_names=True)
    with pytest.raises(ValueError, match="finite positive"):
        check_sigmas([1.0, -2.0])
    assert check_sigmas([2.0, 0.5, 1.0], ascending=True).tolist() == [0.5, 1.0, 2.0]
    assert check_sigmas(torch.tensor([3.0, 1.0])).dtype == torch.float64
    with pytest.raises(ValueError, match="at least 2 distinct"):
        check_sigmas([1.0, 1.0], min_count=2, ascending=True)
    with pytest.raises(TypeError, match="list of noise levels"):
        check_sigmas("0.5")


def test_counts_choices_and_intervals():
    assert check_count(3, "n") == 3 and check_count(0, "seed", 0) == 0 and check_optional_count(None, "n") is None
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        check_count(0, "n")
    for bad in (2.5, True, "3"):  # the wrong type is both a TypeError and a ValueError
        with pytest.raises(WrongType, match="n must be an integer >= 1"):
            check_count(bad, "n")
        assert issubclass(WrongType, TypeError) and issubclass(WrongType, ValueError)
    assert check_choice("a", "x", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"x must be one of \['a', 'b'\], got 'c'"):
        check_choice("c", "x", ("a", "b"))
    assert check_positive(2, "t") == 2.0
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="t must be a finite positive number"):
            check_positive(bad, "t")
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 1.0"):
        check_open_unit(1.0, "level")
    with pytest.raises(ValueError, match="num_train = 9 exceeds the 8 images available in digits"):
        check_subset(9, "num_train", 8, "digits")
