-- Usage of every node, so that a usage report through any node covers all
-- of them. Each row is what one second added to one minute's totals of a
-- tenant's deployment and the models its requests loaded (the line a node
-- also appends to its DATA_DIR/usage/minutes-DAY.jsonl): a minute's rows
-- sum to its totals.
CREATE TABLE gpuwasm_usage_minutes (
    minute bigint NOT NULL,
    tenant text NOT NULL,
    line jsonb NOT NULL
);
CREATE INDEX gpuwasm_usage_minutes_by_minute ON gpuwasm_usage_minutes (minute, tenant);
