"""What the rollout guard is told: which failures count against an arm, and which arms obey an
injected fault."""

import types

import asyncpg
import pytest
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException

from cluster.core.rollout import LiveConfig
from cluster.core.vocabulary import ARMS, Arm, FeatureFlags
from cluster.platform.database import DatabaseUnavailable
from serve_app.arm import InjectedFault, PipelineArm
from serve_app.ingress import ArmUnavailable, _arm_failed


def from_replica(error: Exception) -> Exception:
    """The error as a Serve handle raises it in the ingress: Ray's wrapper, an instance of the cause too."""
    return RayTaskError("search", "Traceback ...", error).as_instanceof_cause()


@pytest.mark.parametrize("error, counts", [
    (ArmUnavailable("arm 'treatment' is unavailable"), True),
    (from_replica(RuntimeError("bug in the arm")), True),
    (from_replica(InjectedFault("drill")), True),
    (HTTPException(502), True),
    (from_replica(DatabaseUnavailable("database unavailable")), False),  # shared by both arms
    (from_replica(asyncpg.CharacterNotInRepertoireError("invalid byte sequence: 0x00")), False),  # the caller's NUL
    (HTTPException(404), False),
])
def test_only_the_arms_own_server_side_failures_count(error, counts):
    assert _arm_failed(error) is counts


def live(weight: float, faults: dict[Arm, bool] | None = None) -> LiveConfig:
    return LiveConfig(3, "replay_10", weight, {arm: FeatureFlags() for arm in ARMS},
                      faults or {arm: False for arm in ARMS})


@pytest.mark.parametrize("environment, fails", [("test", True), ("production", False), ("development", False)])
def test_a_fault_is_obeyed_only_by_arms_running_in_the_test_environment(environment, fails):
    arm = object.__new__(PipelineArm.func_or_class)
    arm._arm = Arm.TREATMENT
    arm._faults_allowed = environment == "test"  # as the constructor sets it from the arm's own settings
    arm._live = types.SimpleNamespace(current=live(0.5, {Arm.CONTROL: False, Arm.TREATMENT: True}))
    if fails:
        with pytest.raises(InjectedFault):
            arm._check_fault()
    else:
        arm._check_fault()
