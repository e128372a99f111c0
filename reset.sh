#!/usr/bin/env bash
# Wipe the project's tables and recreate them (and the master data) from a schema file.
#   bash reset.sh [-y] [schema.sql]
# Uses .env's DB_* settings, or the local stack's database when .env has none. A database that
# is not the local one is only wiped after you type its name, or with -y.
set -euo pipefail
cd "$(dirname "$0")"
yes=0
schema=schema.sql
for arg in "$@"; do
  case "$arg" in
    -y|--yes) yes=1 ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "reset.sh: unknown option $arg (use -y or a schema file)" >&2; exit 2 ;;
    *) schema=$arg ;;
  esac
done
[ -f "$schema" ] || { echo "reset.sh: schema file $schema not found" >&2; exit 2; }
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# the password reaches psql in its environment (PGPASSWORD), never on a command line
exports=$("$PY" localstack.py psql-env) || exit 1
eval "$exports"
PSQL=$(command -v psql || true)
[ -x "${LMNH_PSQL:-}" ] && PSQL=$LMNH_PSQL
if [ "$LMNH_DB_LOCAL" != 1 ] && [ "$yes" != 1 ]; then
  if [ ! -t 0 ]; then
    echo "reset.sh: refusing to wipe $PGDATABASE on $PGHOST without confirmation: rerun with -y" >&2
    exit 1
  fi
  read -r -p "This deletes every row in $PGDATABASE on $PGHOST. Type the database name to go on: " answer
  [ "$answer" = "$PGDATABASE" ] || { echo "reset.sh: not confirmed; nothing changed" >&2; exit 1; }
fi
"$PSQL" -X -q -v ON_ERROR_STOP=1 <<'SQL'
SET client_min_messages = warning;
BEGIN;
DROP VIEW IF EXISTS exhibition_info, request_info, rating_info CASCADE;
DROP TABLE IF EXISTS rating_interaction, request_interaction, rejected_event, s3_object_load,
    kafka_offset, alert_outbox, event_source, exhibition, department, floor, rating, request CASCADE;
COMMIT;
SQL
"$PSQL" -X -q -v ON_ERROR_STOP=1 -1 -f "$schema"
echo "reset $PGDATABASE on $PGHOST:$PGPORT from $schema"
