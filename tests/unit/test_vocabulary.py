import dataclasses

import pytest

from cluster.core.vocabulary import (
    ARMS,
    STRATEGIES,
    Arm,
    FeatureFlags,
    Flag,
    Strategy,
    parse_arm,
    parse_flag,
    parse_strategy,
)


def test_feature_flags_has_one_field_per_flag():
    assert [field.name for field in dataclasses.fields(FeatureFlags)] == [flag.value for flag in Flag]


def test_an_unknown_flag_is_refused_with_one_message_wherever_it_enters():
    message = "unknown flag 'warp_drive'; flags: soft_q_bandit, debate_mode, experience_replay"
    for enter in (lambda: parse_flag("warp_drive"),
                  lambda: FeatureFlags.from_mapping({"warp_drive": True}),
                  lambda: FeatureFlags().with_changes({"debate_mode": True, "warp_drive": False})):
        with pytest.raises(ValueError, match=message):
            enter()


def test_flags_change_by_name_and_read_by_attribute():
    flags = FeatureFlags().with_changes({"soft_q_bandit": True})
    assert flags.soft_q_bandit and flags.is_on(Flag.SOFT_Q_BANDIT) and not flags.debate_mode
    assert flags.as_dict()["soft_q_bandit"] is True and FeatureFlags.from_mapping(flags.as_dict()) == flags
    assert FeatureFlags() == FeatureFlags.from_mapping({})  # all off
    with pytest.raises(AttributeError):
        flags.soft_q_banditt  # noqa: B018  a misspelt flag is an error, not "off"


def test_strategies_in_a_fixed_order():
    assert STRATEGIES == ("lexical", "dense", "hybrid_rrf", "hybrid_weighted", "hybrid_complete")
    assert STRATEGIES[2] is Strategy.HYBRID_RRF == "hybrid_rrf"
    assert parse_strategy("dense") is Strategy.DENSE and parse_arm("treatment") is Arm.TREATMENT
    assert ARMS == (Arm.CONTROL, Arm.TREATMENT)
    with pytest.raises(ValueError, match="unknown strategy 'magic'; strategies: lexical, dense"):
        parse_strategy("magic")


def test_only_working_flags_claim_a_behaviour():
    assert {flag for flag in Flag if flag.behaviour} == {Flag.SOFT_Q_BANDIT, Flag.EXPERIENCE_REPLAY,
                                                         Flag.DEBATE_MODE}
