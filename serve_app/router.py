"""Sticky weighted assignment of callers to arms.

Each caller key (the API key id, or the user id a key allowed to name users gives) hashes to a
fixed point u in [0, 1). Arms own consecutive slices of [0, 1) in a fixed order, treatments
first, control last: with a treatment at weight w, callers with u < w get it. Raising w only adds callers (everyone who had
the treatment keeps it); lowering it only removes them. SHA-256 rather than `hash()`, so every
replica and every restart agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cluster.core.vocabulary import Arm


def caller_key(key_id: str, user_id: str | None, may_name_users: bool) -> str:
    """Who is routed: the key, unless it may name its users (a front end) and names one.

    Otherwise any caller could pick its arm, and steer the guard, by trying user ids.
    """
    return user_id if may_name_users and user_id else key_id


def unit_interval_point(caller_key: str) -> float:
    """A uniform, stable point in [0, 1) for a caller."""
    digest = hashlib.sha256(caller_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_arm(caller_key: str, treatment_weights: Mapping[Arm, float]) -> Arm:
    """The arm for a caller, given each treatment's share of traffic (the rest is control).

    `treatment_weights` is ordered; shares must be in [0, 1] and sum to at most 1.
    """
    point = unit_interval_point(caller_key)
    upper = 0.0
    for arm, weight in treatment_weights.items():
        upper += weight
        if point < upper:
            return arm
    return Arm.CONTROL
