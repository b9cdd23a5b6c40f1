"""The shared argument checks: each names the argument, TypeError for the wrong type, ValueError out of range."""

import numpy as np
import pytest

from tl_multimodal._validate import check_int, check_ints, check_number, exactly_one


def test_check_int_bounds_and_types():
    assert check_int(3, "n") == 3 and check_int(0, "layer", minimum=0, maximum=0) == 0
    assert check_int(-5, "index", minimum=None) == -5
    assert type(check_int(np.int64(2), "n")) is int and check_int(np.int64(2), "n") == 2  # what the parent takes
    for bad in (True, np.bool_(True), 2.0, np.float32(2), "2", None):
        with pytest.raises(TypeError, match="n must be an int, got"):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 11\], got 12"):
        check_int(12, "layer", minimum=0, maximum=11)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 11\], got -1"):
        check_int(-1, "layer", minimum=0, maximum=11)
    with pytest.raises(ValueError, match="k must be <= 4, got 5"):
        check_int(5, "k", minimum=None, maximum=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        check_ints(n_steps=2, batch_size=0)


def test_check_number_is_finite_and_bounded():
    assert check_number(2, "t") == 2 and check_number(np.float32(0.5), "t") == 0.5
    assert check_number(0.0, "temperature", minimum=0) == 0.0
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="t must be a number, got"):
            check_number(bad, "t")
    with pytest.raises(ValueError, match="vmax must be a finite number, got inf"):
        check_number(float("inf"), "vmax")
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            check_number(bad, "temperature", minimum=0)


def test_exactly_one_names_the_given_argument_or_all():
    assert exactly_one(images=None, image_features=1) == "image_features"
    for values in ({"a": None, "b": None}, {"a": 1, "b": 2}):
        with pytest.raises(ValueError, match="pass exactly one of a= and b="):
            exactly_one(**values)
