-- The control state of gpuwasm nodes sharing one PostgreSQL database.
-- Records are the JSON the embedded store keeps; the key columns repeat
-- their keys so the database enforces them.

-- One row: the state's revision, raised by every commit. A commit names the
-- revision it was decided on and fails if another node moved it since.
CREATE TABLE gpuwasm_revision (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    revision bigint NOT NULL
);
INSERT INTO gpuwasm_revision (revision) VALUES (0);

CREATE TABLE gpuwasm_tenants (
    name text PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE gpuwasm_tokens (
    id text PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE gpuwasm_deployments (
    tenant text NOT NULL,
    name text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE gpuwasm_versions (
    tenant text NOT NULL,
    name text NOT NULL,
    version bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (tenant, name, version)
);

CREATE TABLE gpuwasm_models (
    namespace text NOT NULL,
    name text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (namespace, name)
);
