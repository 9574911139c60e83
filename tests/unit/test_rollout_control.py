"""The control actor's body without Ray or a database: changes apply in memory at once, even while
the database hangs, and are applied again on top of the stored state once it loads."""

import dataclasses
import socket
import time

import pytest
import yaml

from cluster.actors.rollout_control import RolloutController
from cluster.core.rollout import RolloutState, parse_plan
from cluster.core.vocabulary import Arm, FeatureFlags
from test_rollout import SHIPPED

PLAN = parse_plan(yaml.safe_load(SHIPPED))


@pytest.fixture(scope="module")
def hanging_database() -> str:
    """A URL whose server accepts connections and never answers (as a wedged PostgreSQL would)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"postgresql://nobody@127.0.0.1:{listener.getsockname()[1]}/nothing"
    listener.close()


@pytest.fixture
def controller(hanging_database) -> RolloutController:
    return RolloutController(hanging_database, PLAN, FeatureFlags(), allow_faults=False)


def stored(version: int, weight: float) -> RolloutState:
    state = RolloutState.initial(PLAN, FeatureFlags())
    return dataclasses.replace(state, version=version, stage="softq_replay_50", treatment_weight=weight,
                               flags={**state.flags, Arm.TREATMENT: FeatureFlags(soft_q_bandit=True)})


def test_starts_on_defaults_without_waiting_for_the_database(controller):
    status = controller.status()
    assert status["store"] == {"loaded": False, "saved": False}
    assert status["treatment_weight"] == 0.0 and status["stage"] == "baseline"


def test_a_rollback_applies_at_once_while_the_database_hangs(controller):
    started = time.monotonic()
    live = controller.rollback("p95 regression")
    assert time.monotonic() - started < 0.5
    assert live.treatment_weight == 0.0 and live.version == 2
    assert controller.status()["rolled_back"] == "p95 regression"


def test_until_loaded_replicas_keep_their_config_unless_something_changed(controller):
    assert controller.live_if_newer(7, "ingress#a") is None  # it has one: keep it
    assert controller.live_if_newer(0, "control#b").version == 1  # a new replica gets the defaults
    controller.rollback("drill")
    assert controller.live_if_newer(7, "ingress#a").treatment_weight == 0.0
    assert controller.status()["replicas"] == {"control#b": 0, "ingress#a": 7}


def test_changes_made_before_loading_are_applied_again_on_the_stored_state(controller):
    controller.set_flags("control", {"debate_mode": True})
    controller.rollback("database down")
    controller._adopt(stored(version=7, weight=0.5))
    live = controller.live_if_newer(7)
    assert live.version == 9 and live.treatment_weight == 0.0  # past both the stored and the in-memory versions
    assert live.flags[Arm.TREATMENT].soft_q_bandit  # the stored state's flags, kept
    assert live.flags[Arm.CONTROL].debate_mode
    status = controller.status()
    assert status["stage"] == "softq_replay_50" and status["rolled_back"] == "database down"
    assert status["store"] == {"loaded": True, "saved": False}  # saved in the background, once it can
    assert [e["event"].split(":")[0] for e in status["events"]] == ["flags on control", "rolled back to 0%"]


def test_with_nothing_changed_the_stored_state_is_adopted_as_it_is(controller):
    controller._adopt(stored(version=7, weight=0.5))
    assert controller.live_if_newer(0).version == 7 and controller.live_if_newer(7) is None
    assert controller.status()["store"] == {"loaded": True, "saved": True}


def test_faults_are_never_stored():
    state = dataclasses.replace(stored(3, 0.5), faults={Arm.CONTROL: False, Arm.TREATMENT: True})
    assert "faults" not in state.to_json()
    older_row = {**state.to_json(), "faults": {"control": False, "treatment": True}}
    assert RolloutState.from_json(older_row).faults == {Arm.CONTROL: False, Arm.TREATMENT: False}
