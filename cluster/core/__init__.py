"""Pure: the vocabulary and the rollout statistics. No Ray, no database, no settings."""
