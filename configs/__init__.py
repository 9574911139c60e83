"""Declarative configuration shipped with the project (read through `cluster.platform.settings`)."""
