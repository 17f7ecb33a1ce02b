"""exporter.families.Family writes its sample lines from templates; prometheus_client's encoders
write them from its samples. Both must give the same bytes for any label values and states."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from iscsimple.exporter.exposition import encode, encode_both
from iscsimple.exporter.families import Family, counter, gauge

# Anything a VM name or a sysfs state may hold, quotes, backslashes, newlines and braces included.
TEXT = st.text(st.sampled_from('ab"\\\n{}é ,=0'), max_size=6)
VALUE = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 0.5, 1e-7, 12345678.9]),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
)
STATES = ("in_sync", "faulty", "spare")


class _Once:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def _lines_of(text: bytes) -> list[str]:
    """Each line without its value (prometheus_client spells some floats otherwise)."""
    return [line.rsplit(" ", 1)[0] for line in text.decode().splitlines()]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(TEXT, TEXT, VALUE), max_size=4),
    st.lists(st.tuples(TEXT, st.one_of(st.none(), st.sampled_from(STATES), TEXT)), max_size=4),
    st.lists(st.tuples(TEXT, VALUE), max_size=3),
)
def test_family_lines_equal_prometheus_clients(plain, one_hot, counted):
    # Label names declared out of order: the lines list them sorted, as prometheus_client does.
    a = gauge("test_plain", 'help with "quotes" and \\', ["zone", "label"])
    for zone, label, value in plain:
        a.add_metric([zone, label], value)
    b = gauge("test_state", "one-hot", ["target", "lun", "state"])
    for target, current in one_hot:
        b.add_one_hot([target, "1"], STATES, current)
    c = counter("test_events_total", "a counter", ["result"])
    for result, value in counted:
        c.add_metric([result], value)
    d = gauge("test_bare", "no labels", [])
    d.add_metric([], 3)
    families = [a, b, c, d]
    text, om = encode_both(families)
    assert _lines_of(text) == _lines_of(generate_latest(_Once(families)))
    assert _lines_of(om) == _lines_of(generate_openmetrics(_Once(families)))
    # And what the generic path writes from the samples, value spelling included.
    assert encode([_as_metric(family) for family in families]) == text


def _as_metric(family: Family):
    from prometheus_client.core import Metric

    metric = Metric(family.name, family.documentation, family.type)
    metric.samples = family.samples
    return metric


def test_one_hot_block_has_every_state_and_an_unknown_one_after_them():
    family = gauge("test_state", "one-hot", ["label", "state"])
    family.add_one_hot(["x"], STATES, "faulty")
    family.add_one_hot(["y"], STATES, "weird{0}")
    family.add_one_hot(["z"], STATES, None)
    assert family.encoded().decode().splitlines() == [
        'test_state{label="x",state="in_sync"} 0.0',
        'test_state{label="x",state="faulty"} 1.0',
        'test_state{label="x",state="spare"} 0.0',
        'test_state{label="y",state="in_sync"} 0.0',
        'test_state{label="y",state="faulty"} 0.0',
        'test_state{label="y",state="spare"} 0.0',
        'test_state{label="y",state="weird{0}"} 1.0',
        'test_state{label="z",state="in_sync"} 0.0',
        'test_state{label="z",state="faulty"} 0.0',
        'test_state{label="z",state="spare"} 0.0',
    ]


def test_wrong_number_of_label_values_is_an_error_not_a_shifted_line():
    family = gauge("test_plain", "doc", ["label"])
    family.add_metric(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="2 label values"):
        family.encoded()
