#!/usr/bin/env bash
# Open psql on the project's database: the one in .env, or the local stack's when .env has no DB_*.
#   bash connect.sh [psql arguments...]
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exports=$("$PY" localstack.py psql-env) || exit 1
eval "$exports"
PSQL=$(command -v psql || true)
[ -x "${LMNH_PSQL:-}" ] && PSQL=$LMNH_PSQL
exec "$PSQL" "$@"
