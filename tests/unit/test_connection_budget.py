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
    # 1 ingress, 2 arms (control, treatment), the actors, one command beside the service
    assert check_connection_budget(defaults, max_connections=100, reserved=3) == 4 * pool + ACTOR_CONNECTIONS == 44


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
    assert "604 database connections" in message and "accepts 97" in message
    # (97 - 4 actors) // 4 pooled processes = 23
    assert "DB_POOL_SIZE + DB_MAX_OVERFLOW (now 50 + 100 per process) to at most 23" in message
    assert "max_connections" in message


def test_too_many_replicas_for_any_pool_name_the_replicas():
    crowded = settings(DTRAG_PIPELINE_REPLICAS="40")
    with pytest.raises(ConnectionBudgetExceeded) as refused:
        check_connection_budget(crowded, max_connections=20, reserved=3)
    assert "DB_POOL_SIZE" not in str(refused.value) and "DTRAG_PIPELINE_REPLICAS" in str(refused.value)


def test_exactly_full_is_allowed():
    defaults = settings()
    assert check_connection_budget(defaults, max_connections=47, reserved=3) == 44
    with pytest.raises(ConnectionBudgetExceeded):
        check_connection_budget(defaults, max_connections=46, reserved=3)
