"""Errors shared across packages."""


class ServiceUnavailable(RuntimeError):
    """A dependency (the database, an arm) cannot serve right now: HTTP 503, retry later.

    `retry_after_s` becomes the response's `Retry-After`: how soon a retry may find it back.
    """

    retry_after_s: int = 1


class DeadlineExceeded(TimeoutError):
    """A request ran past the service's deadline and its work was cancelled: HTTP 504."""


class Refused(RuntimeError):
    """A valid request the service will not carry out in its current state: HTTP 409, the message says why."""
