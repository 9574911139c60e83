"""The checkpoint format: a versioned header, then a NumPy `.npz` of the state's arrays and its JSON tree.

A `state_dict` is nested dicts and lists of scalars, strings and NumPy arrays. Each array is
stored as an `.npz` member and replaced in the JSON tree by a reference to it; the tree is one
more member. Reading never unpickles (`allow_pickle=False`), so a stored checkpoint can only
ever yield plain values and numeric arrays; anything wrong raises `CheckpointError`.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"DTRAG-CHECKPOINT"
FORMAT = 1  # bump when the layout of the file (not of a state_dict) changes
_HEADER = struct.Struct(">H")
_TREE = "tree"
_ARRAY_KEY = "__array__"


class CheckpointError(ValueError):
    """Bytes that are not a checkpoint this code reads (corrupt, another format, pickled)."""


def encode(state: Mapping[str, Any]) -> bytes:
    """`state` (nested dicts, lists, scalars, strings, None and NumPy arrays) as checkpoint bytes."""
    arrays: dict[str, np.ndarray] = {}

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError("object arrays cannot be checkpointed")
            name = f"a{len(arrays)}"
            arrays[name] = value
            return {_ARRAY_KEY: name}
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__}")

    tree = json.dumps(plain(state), allow_nan=True).encode()
    body = io.BytesIO()
    np.savez(body, **arrays, **{_TREE: np.frombuffer(tree, np.uint8)})
    return MAGIC + _HEADER.pack(FORMAT) + body.getvalue()


def decode(blob: bytes) -> dict[str, Any]:
    """The state `encode` wrote; CheckpointError for anything else."""
    blob = bytes(blob)
    if not blob.startswith(MAGIC):
        raise CheckpointError("not a checkpoint of this service (no header; an older pickled one?)")
    offset = len(MAGIC) + _HEADER.size
    if len(blob) < offset:
        raise CheckpointError("checkpoint truncated in its header")
    (version,) = _HEADER.unpack_from(blob, len(MAGIC))
    if version != FORMAT:
        raise CheckpointError(f"checkpoint has format {version}, this code reads {FORMAT}")
    try:
        with np.load(io.BytesIO(blob[offset:]), allow_pickle=False) as members:
            arrays = {name: members[name] for name in members.files}
        tree = json.loads(arrays.pop(_TREE).tobytes())
    except Exception as error:  # zip, npy and JSON errors alike mean damaged bytes
        raise CheckpointError(f"checkpoint is damaged: {type(error).__name__}: {error}") from error

    def restored(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_ARRAY_KEY}:
                try:
                    return arrays[value[_ARRAY_KEY]]
                except KeyError:
                    raise CheckpointError(f"checkpoint lacks array {value[_ARRAY_KEY]!r}") from None
            return {key: restored(item) for key, item in value.items()}
        if isinstance(value, list):
            return [restored(item) for item in value]
        return value

    state = restored(tree)
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint does not hold a state dict")
    return state
