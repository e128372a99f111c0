#!/usr/bin/env bash
# Open psql on the project's database: the one in .env, or the local stack's when .env has no DB_*.
#   bash connect.sh [psql arguments...]
# The password (DB_PASS, or the local one from .local/postgres-password) reaches psql in its
# environment (PGPASSWORD, set by `localstack.py psql-env`), never on a command line.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exports=$("$PY" localstack.py psql-env) || exit 1
eval "$exports"
PSQL=$(command -v psql || true)
[ -x "${LMNH_PSQL:-}" ] && PSQL=$LMNH_PSQL
exec "$PSQL" "$@"
