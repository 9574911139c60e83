"""The platform every other layer stands on: settings, database, migrations, logging, metrics, Ray runtime, API keys."""
