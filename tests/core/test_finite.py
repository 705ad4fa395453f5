"""check_finite: the one finite-number check behind every float argument (SR lambdas, MAR cfg/temperature, NASA/NAG)."""

import re

import numpy as np
import pytest

from swiftstep.core.finite import check_finite


def test_finite_reals_come_back_as_floats():
    for value in (0, 3, -2.5, np.float32(0.25), np.int64(2)):
        out = check_finite("x", value)
        assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), True, "1.0", None])
def test_anything_else_is_refused_with_the_name_and_the_value(value):
    with pytest.raises(ValueError, match=rf"^`lambda_sem` must be a finite number, got {re.escape(repr(value))}\.$"):
        check_finite("lambda_sem", value)
