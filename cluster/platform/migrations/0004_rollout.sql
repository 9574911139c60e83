-- The rollout control plane's state (stage, weights, flags per arm, recent events), so a
-- rollback or an operator's change survives a restart of the actor that owns it.
CREATE TABLE rollout_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
