import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdq.descriptor import QuantDescriptor
from qdq.tensor_quant import QuantDescriptor as CompatDescriptor


def test_compat_import_is_the_same_class():
    assert CompatDescriptor is QuantDescriptor


@pytest.mark.parametrize("kwargs, match", [
    ({"num_bits": 1}, "num_bits"),
    ({"num_bits": 17}, "num_bits"),
    ({"num_bits": 8.0}, "num_bits"),
    ({"calib_method": "entropy"}, "calib_method"),
    ({"amax": 0.0}, "amax"),
    ({"amax": float("nan")}, "amax"),
    ({"amax": [1.0, -2.0]}, "amax"),
    ({"axis": "0"}, "axis"),
    ({"unsigned": True, "narrow_range": True}, "narrow_range"),
    ({"num_bins": 10}, "num_bins"),
])
def test_bad_values_are_refused_with_the_field_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantDescriptor(**kwargs)


def test_error_names_the_descriptor():
    with pytest.raises(ValueError, match="'conv1.input'"):
        QuantDescriptor(name="conv1.input", num_bits=40)


@settings(max_examples=80, deadline=None)
@given(
    num_bits=st.integers(2, 16),
    name=st.none() | st.text(max_size=10),
    fake_quant=st.booleans(),
    axis=st.none() | st.integers(-3, 3) | st.tuples(st.integers(0, 3), st.integers(0, 3)),
    amax=st.none() | st.floats(1e-3, 1e4) | st.lists(st.floats(1e-3, 1e4), min_size=1,
                                                      max_size=4),
    learn_amax=st.booleans(),
    unsigned=st.booleans(),
    calib_method=st.sampled_from(["max", "histogram"]),
    num_bins=st.integers(128, 8192),
    skip_zeros=st.booleans(),
)
def test_dict_round_trip_loses_nothing(**kw):
    kw["narrow_range"] = not kw["unsigned"] and kw["num_bits"] % 2 == 0
    kw["learn_amax"] = kw["learn_amax"] and kw["axis"] is None  # learned amax: per tensor
    d = QuantDescriptor(**kw)
    plain = d.to_dict()
    assert set(plain) == set(QuantDescriptor.__dataclass_fields__)
    back = QuantDescriptor.from_dict(plain)
    assert back == d and back.to_dict() == plain


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bits"):
        QuantDescriptor.from_dict({"bits": 8})


def test_list_axis_becomes_tuple_and_per_channel_flag():
    d = QuantDescriptor(axis=[0, 1])
    assert d.axis == (0, 1) and d.per_channel
    assert not QuantDescriptor().per_channel
