"""Pure-numpy learning code: prioritized replay, the soft-Q strategy policy, query state keys."""
