-- Promotions of candidate policies into the learning actor, and their rollbacks: who, when, the
-- judgement, and the model each change replaced (what `dtrag policy rollback` restores).
CREATE TABLE policy_changes (
    id               bigserial PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    change           text NOT NULL CHECK (change IN ('promote', 'rollback')),
    head             text NOT NULL,
    candidate        text,                  -- the candidate's name (a promotion)
    key_id           text NOT NULL,         -- the API key that asked
    forced           boolean NOT NULL DEFAULT false,
    policy_version   integer NOT NULL,      -- served from this change on
    previous_version integer NOT NULL,
    judgement        jsonb,                 -- candidate vs live, doubly robust (learners.candidate)
    replaced_model   bytea NOT NULL,        -- the head's model before the change (learners.checkpoint format)
    undone_by        bigint REFERENCES policy_changes (id)
);
CREATE INDEX policy_changes_open_promotions_idx ON policy_changes (id) WHERE change = 'promote' AND undone_by IS NULL;
