-- Checkpoints of the replay shards (`cluster.actors.replay_shards`), written with the learning
-- state's own checkpoint: per shard the latest, every head's buffer in one blob.
CREATE TABLE replay_shard_checkpoints (
    shard      integer PRIMARY KEY,
    num_shards integer NOT NULL,            -- how many shards shared the experiences when it was written
    saved_at   timestamptz NOT NULL DEFAULT now(),
    sizes      jsonb NOT NULL,              -- per head, experiences held (for people)
    state      bytea NOT NULL               -- per head, the buffer's state_dict (learners.checkpoint format)
);
