"""Hypothesis strategies for rule parameters (the unit and the integration tests of hostile rules share them)."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from fraudstream.consumer.features import CHANNELS
from fraudstream.consumer.rules import PARAMETER_BOUNDS

ANY_VALUE = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.lists(st.text(max_size=4), max_size=2)
)  # whatever a parameter map in rule.avsc can carry


def parameter_values(key: str):
    """Values for one parameter: mostly of its type and within its bounds (so that whole rules pass and run),
    else just past a bound, or of any type."""
    bound = PARAMETER_BOUNDS[key]
    if bound.type is list:
        items = (
            st.sampled_from([*CHANNELS, "x"])
            if key == "channels"
            else st.sampled_from(["5411", "5815", "0000", "9999", "²²²²", "٥٤١١", "541"])
        )  # digits int() refuses
        within = st.lists(items, max_size=3)
        past = st.lists(st.text(max_size=4), min_size=1, max_size=2)
    elif bound.type is bool:
        within = past = st.booleans()
    elif bound.type is int:
        within = st.integers(int(bound.minimum), int(bound.maximum))
        past = st.sampled_from([int(bound.minimum) - 1, int(bound.maximum) + 1, 2**63 - 1, -(2**63)])
    else:
        within = st.floats(bound.minimum, bound.maximum)
        past = st.sampled_from([math.nan, math.inf, -math.inf, 1e300, bound.maximum * 1.001 + 1, -1.0])
    return st.one_of(within, within, within, past, ANY_VALUE)
