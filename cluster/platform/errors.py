"""Errors shared across packages."""


class ServiceUnavailable(RuntimeError):
    """A dependency (the database, an arm) cannot serve right now: HTTP 503, retry later."""
