"""Bringing DT-RAG up and operating it: settings, database, ingestion, Ray runtime, CLI."""

__version__ = "0.1.0"
