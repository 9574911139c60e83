"""The cluster's Ray actors: rollout control, learning state, learners; started in `start.py`."""

NAMESPACE = "dtrag"
