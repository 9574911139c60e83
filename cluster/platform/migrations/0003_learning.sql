-- Every served search (when experience_replay is on) and, once feedback arrives, its reward.
CREATE TABLE experiences (
    search_id      text PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    arm            text NOT NULL,
    session_id     text,
    state_key      text NOT NULL,
    action         smallint NOT NULL CHECK (action >= 0),
    strategy       text NOT NULL,
    propensity     real NOT NULL CHECK (propensity > 0 AND propensity <= 1),
    policy_version integer NOT NULL,
    served_doc_ids text[] NOT NULL,
    reward         double precision,
    next_state_key text,
    feedback       jsonb,
    feedback_at    timestamptz
);
CREATE INDEX experiences_session_idx ON experiences (session_id, created_at) WHERE session_id IS NOT NULL;
CREATE INDEX experiences_feedback_at_idx ON experiences (feedback_at) WHERE feedback_at IS NOT NULL;

-- Checkpoints of the LearningState actor: the Q-table (readable JSON) and the replay buffer.
CREATE TABLE q_table_snapshots (
    id             bigserial PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    policy_version integer NOT NULL,
    actions        text[] NOT NULL,
    q_table        jsonb NOT NULL,
    replay_state   bytea NOT NULL,
    stats          jsonb NOT NULL
);
