-- Requests waiting for an instance on each node, apart from its load: a
-- model's holder with requests waiting is passed over for a cold load on
-- a node with none.
ALTER TABLE gpuwasm_nodes ADD COLUMN queued bigint NOT NULL DEFAULT 0;
