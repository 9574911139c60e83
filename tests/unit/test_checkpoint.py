"""The checkpoint codec: a round trip keeps every value and dtype; anything else is a CheckpointError."""

import pickle
import struct

import numpy as np
import pytest

from learners import checkpoint
from learners.checkpoint import CheckpointError, decode, encode
from test_learning_core import trained_core


def test_round_trip_keeps_values_dtypes_and_nesting():
    state = {"head": {"ints": np.arange(6, dtype=np.int32).reshape(2, 3), "flags": np.array([True, False]),
                      "empty": np.zeros((0, 4)), "big": 2**100, "nan": float("nan"), "name": "lexical",
                      "nothing": None, "pair": (1, 2.5), "scalar": np.float32(0.5), "count": np.int64(7)}}
    head = decode(encode(state))["head"]
    for key in ("ints", "flags", "empty"):
        assert head[key].dtype == state["head"][key].dtype
        np.testing.assert_array_equal(head[key], state["head"][key])
    assert head["big"] == 2**100 and np.isnan(head["nan"]) and head["name"] == "lexical" and head["nothing"] is None
    assert head["pair"] == [1, 2.5] and head["scalar"] == 0.5 and head["count"] == 7


def test_a_learning_core_state_round_trips_byte_for_byte():
    state = {"retrieval": trained_core().state_dict()}
    assert pickle.dumps(decode(encode(state))) == pickle.dumps(state)


def test_object_arrays_are_refused_when_writing():
    with pytest.raises(TypeError, match="object arrays"):
        encode({"x": np.array([{"a": 1}], dtype=object)})


@pytest.fixture
def blob() -> bytes:
    return encode({"x": np.arange(100.0), "y": {"z": [1, 2, 3]}})


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated
    lambda b: b[:40] + bytes(256) + b[296:],  # zeroed in the middle
    lambda b: b[: len(checkpoint.MAGIC)],  # header cut
    lambda b: b[: len(checkpoint.MAGIC) + 2] + b"not a zip at all",
    lambda b: b"",
])
def test_damaged_bytes_are_a_checkpoint_error(blob, damage):
    with pytest.raises(CheckpointError):
        decode(damage(blob))


def test_another_format_version_is_refused_by_name(blob):
    other = checkpoint.MAGIC + struct.pack(">H", checkpoint.FORMAT + 1) + blob[len(checkpoint.MAGIC) + 2:]
    with pytest.raises(CheckpointError, match=f"format {checkpoint.FORMAT + 1}, this code reads {checkpoint.FORMAT}"):
        decode(other)


def test_a_pickled_checkpoint_is_never_unpickled():
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled",))

    with pytest.raises(CheckpointError, match="no header"):
        decode(pickle.dumps({"retrieval": Boom()}))
