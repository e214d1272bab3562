-- The nodes sharing this state, for model-aware routing: each writes its
-- row every second (where it is reached, which models it holds resident,
-- how loaded it is) and reads the others'.
CREATE TABLE gpuwasm_nodes (
    id text PRIMARY KEY,
    url text NOT NULL,
    models jsonb NOT NULL,
    load bigint NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now()
);
