"""The connection budget across every process, against the server's max_connections."""

import pytest

from cluster.platform.connection_budget import (
    ACTOR_CONNECTIONS,
    ConnectionBudgetExceeded,
    check_connection_budget,
    connection_budget,
)
from cluster.platform.settings import load_settings


def settings(**environ: str):
    return load_settings(environ=environ)


def test_the_defaults_fit_postgresqls_default_of_100():
    defaults = settings()
    pool = defaults.database.pool_size + defaults.database.max_overflow  # 10
    # 1 ingress, 2 autoscaled arms at their maximum of 3 each, the actors, one command beside the service
    assert check_connection_budget(defaults, max_connections=100, reserved=3) == 8 * pool + ACTOR_CONNECTIONS == 84


def test_an_autoscaled_arm_counts_at_its_maximum_and_a_fixed_count_replaces_it():
    parts = {part.what: part.connections for part in connection_budget(settings(DTRAG_PIPELINE_REPLICAS="1"))}
    assert parts["arms 4 x 10"] == 40  # control pinned to 1, treatment autoscaled up to 3


def test_every_process_counts():
    parts = {part.what: part.connections for part in connection_budget(settings(
        DB_POOL_SIZE="4", DB_MAX_OVERFLOW="2", DTRAG_INGRESS_REPLICAS="2", DTRAG_PIPELINE_REPLICAS="3",
        DTRAG_TREATMENT_REPLICAS="1"))}
    assert parts == {"ingress 2 x 6": 12, "arms 4 x 6": 24, "actors": ACTOR_CONNECTIONS,
                     "a command beside the service": 6}


def test_the_old_services_pool_is_refused_naming_the_pool_size_that_fits():
    old = settings(DB_POOL_SIZE="50", DB_MAX_OVERFLOW="100")
    with pytest.raises(ConnectionBudgetExceeded) as refused:
        check_connection_budget(old, max_connections=100, reserved=3)
    message = str(refused.value)
    assert "1204 database connections" in message and "accepts 97" in message
    # (97 - 4 actors) // 8 pooled processes (1 ingress, 3 + 3 arms at their maximum, 1 command) = 11
    assert "DB_POOL_SIZE + DB_MAX_OVERFLOW (now 50 + 100 per process) to at most 11" in message
    assert "max_connections" in message


def test_too_many_replicas_for_any_pool_name_the_replicas():
    crowded = settings(DTRAG_PIPELINE_REPLICAS="40")
    with pytest.raises(ConnectionBudgetExceeded) as refused:
        check_connection_budget(crowded, max_connections=20, reserved=3)
    assert "DB_POOL_SIZE" not in str(refused.value) and "DTRAG_PIPELINE_REPLICAS" in str(refused.value)


def test_exactly_full_is_allowed():
    defaults = settings()
    assert check_connection_budget(defaults, max_connections=87, reserved=3) == 84
    with pytest.raises(ConnectionBudgetExceeded):
        check_connection_budget(defaults, max_connections=86, reserved=3)
