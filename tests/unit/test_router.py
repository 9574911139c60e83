import subprocess
import sys

from cluster.core.vocabulary import Arm
from serve_app.router import caller_key, choose_arm, unit_interval_point

USERS = [f"user-{i}" for i in range(20_000)]


def test_split_matches_the_weight_within_two_points():
    for weight in (0.1, 0.5, 0.9):
        share = sum(choose_arm(u, {Arm.TREATMENT: weight}) == "treatment" for u in USERS) / len(USERS)
        assert abs(share - weight) < 0.02, (weight, share)


def test_assignment_is_sticky_and_raising_the_share_only_adds_users():
    at_10 = {u for u in USERS if choose_arm(u, {Arm.TREATMENT: 0.1}) == "treatment"}
    at_50 = {u for u in USERS if choose_arm(u, {Arm.TREATMENT: 0.5}) == "treatment"}
    assert at_10 <= at_50
    assert all(choose_arm(u, {Arm.TREATMENT: 0.1}) == "treatment" for u in sorted(at_10)[:100])
    assert all(choose_arm(u, {Arm.TREATMENT: 0.0}) == Arm.CONTROL for u in USERS[:1000])
    assert all(choose_arm(u, {Arm.TREATMENT: 1.0}) == "treatment" for u in USERS[:1000])


def test_points_are_the_same_in_another_process():
    code = "from serve_app.router import unit_interval_point as p; print(p('alice'), p('bob'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.split() == [repr(unit_interval_point("alice")), repr(unit_interval_point("bob"))]


def test_only_a_key_that_may_name_users_routes_by_the_user_it_names():
    assert caller_key("key1", "alice", may_name_users=True) == "alice"
    assert caller_key("key1", None, may_name_users=True) == "key1"
    assert caller_key("key1", "alice", may_name_users=False) == "key1"  # X-User-Id cannot pick an arm
