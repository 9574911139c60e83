"""Offline clients of a running service, over its HTTP API: evaluation, training, operations."""
