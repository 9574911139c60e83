"""Search ids carry the time they were minted, in the API's 32-hex-digit format."""

import re

from serve_app.search_ids import may_be_in_flight, minted_at, new_search_id


def test_an_id_is_32_hex_digits_that_say_when_it_was_minted():
    search_id = new_search_id(clock=lambda: 1_800_000_000.123)
    assert re.fullmatch(r"[0-9a-f]{32}", search_id)
    assert minted_at(search_id) == 1_800_000_000.123
    assert new_search_id() != new_search_id()


def test_only_a_recent_id_may_still_be_on_its_way_to_the_database():
    search_id = new_search_id(clock=lambda: 1000.0)
    assert may_be_in_flight(search_id, window_s=16, now=1000.0)
    assert may_be_in_flight(search_id, window_s=16, now=1016.5)  # within the clock skew
    assert not may_be_in_flight(search_id, window_s=16, now=1018.0)


def test_ids_from_before_the_format_or_from_the_future_are_not_waited_for():
    assert not may_be_in_flight("0" * 32, window_s=16, now=1_800_000_000.0)  # reads as 1970
    assert not may_be_in_flight("f" * 32, window_s=16, now=1_800_000_000.0)  # reads as year 10889
