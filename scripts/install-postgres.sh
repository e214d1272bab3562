#!/usr/bin/env bash
# Installs PostgreSQL 15 from Debian's packages (postgresql-15), for the
# scale-out tests (tests/scale_out.rs): each test starts a server of its own
# on 127.0.0.1 in a temporary data directory (as the `postgres` user when
# run as root, which PostgreSQL refuses to run as), so no system cluster is
# used or needed. Does nothing when the package is present.
set -euo pipefail
if ! dpkg -s postgresql-15 >/dev/null 2>&1; then
  echo "install-postgres: apt-get install postgresql-15" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >&2
fi
test -x /usr/lib/postgresql/15/bin/initdb || { echo "install-postgres: /usr/lib/postgresql/15/bin/initdb is missing" >&2; exit 1; }
