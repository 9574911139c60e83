"""Bringing DT-RAG up and operating it, in layers (lowest first; a layer imports only those below):

    core/      the vocabulary and rollout statistics (pure Python)
    platform/  settings, database, migrations, logging, metrics, Ray runtime, API keys
    data/      reading and ingesting document collections
    actors/    the cluster's Ray actors and the one place they are created
    clients/   offline clients of a running service (evaluate, train, operate)
    cli/       the `dtrag` command

`learners/` (learning math) sits beside `core/`; `serve_app/` (the Serve application) sits
between `actors/` and `clients/`.
"""

__version__ = "0.1.0"
