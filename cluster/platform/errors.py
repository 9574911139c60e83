"""Errors shared across packages."""


class ServiceUnavailable(RuntimeError):
    """A dependency (the database, an arm) cannot serve right now: HTTP 503, retry later."""


class Refused(RuntimeError):
    """A valid request the service will not carry out in its current state: HTTP 409, the message says why."""
