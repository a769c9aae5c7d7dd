import math

import pytest

from riskexp.formatting import format_estimate


@pytest.mark.parametrize("kwargs, text", [
    ({"value": 0.16042, "sd": 0.0141}, "0.160 ± 0.014"),
    ({"value": -0.0123, "lo": -0.2761, "hi": 0.2118}, "-0.012 [-0.276, 0.212]"),
    ({"value": 0.00123, "sd": 0.0456}, "0.0012 ± 0.0456"),         # precision from the spread, not the value
    ({"value": 1234.4, "sd": 56.2}, "1234 ± 56"),
    ({"value": 1.234e-5, "sd": 4e-6}, "1.23e-05 ± 4.00e-06"),
    ({"value": 24.0, "integer": True}, "24"),
    ({"value": 0.1, "lo": 0.02, "hi": 0.18, "sign": "+"}, "+0.100 [+0.020, +0.180]"),
    ({"value": -0.0001, "lo": -0.5, "hi": 0.5, "sign": "+"}, "0.000 [-0.500, +0.500]"),  # no "-0.00" or "+0.00"
    ({"value": 0.3, "sd": 0.02, "sign": "+"}, "+0.300 ± 0.020"),     # the sd is never signed
    ({"value": None}, "-"),
    ({"value": math.nan, "sd": 1.0}, "-"),
    ({"value": 0.5, "sd": math.nan, "lo": 0.4, "hi": 0.6}, "0.500 [0.400, 0.600]"),  # no sd: the interval
])  # fmt: skip
def test_format_estimate(kwargs, text):
    value = kwargs.pop("value")
    assert format_estimate(value, **kwargs) == text
