#!/bin/bash
# PostgreSQL entrypoint: initialise an empty PGDATA once, then exec postgres (PID 1).
#   POSTGRES_USER (default postgres), POSTGRES_DB (default = POSTGRES_USER),
#   POSTGRES_PASSWORD_FILE or POSTGRES_PASSWORD (required on first start),
#   POSTGRES_MAX_CONNECTIONS (default 200), PGDATA (default /var/lib/postgresql/data).
# Arguments starting with "-" are passed to postgres (e.g. -c shared_buffers=256MB);
# any other command is exec'd as is.
set -euo pipefail

die() { echo "postgres-entrypoint: error: $*" >&2; exit 2; }
log() { echo "postgres-entrypoint: $*" >&2; }

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then exec "$@"; fi

PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
max_connections=${POSTGRES_MAX_CONNECTIONS:-200}
[[ $max_connections =~ ^[0-9]+$ ]] && [ "$max_connections" -ge 5 ] \
  || die "POSTGRES_MAX_CONNECTIONS=$max_connections is not a number >= 5"
[ "$(id -u)" != 0 ] || die "run as the postgres user (the image's default USER), not root"

export PGDATA
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    [ -r "$POSTGRES_PASSWORD_FILE" ] \
      || die "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE is missing or not readable by uid $(id -u)"
    password=$(<"$POSTGRES_PASSWORD_FILE")
  else
    password=${POSTGRES_PASSWORD:-}
  fi
  [ -n "$password" ] || die "empty database: set POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD) for the first start"
  [ -w "$PGDATA" ] || die "$PGDATA is not writable by uid $(id -u) (chown it to 999:999, or use a named volume)"
  log "initialising $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
  cleanup() {
    pg_ctl -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    find "$PGDATA" -mindepth 1 -delete 2>/dev/null || true
    die "initialisation failed; $PGDATA emptied so the next start retries"
  }
  trap cleanup ERR
  initdb -D "$PGDATA" --username=postgres --locale=C --encoding=UTF8 \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" \
    start >/dev/null
  export PGINIT_PASSWORD=$password
  psql -X -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -U postgres -d postgres \
    --set=user="$POSTGRES_USER" --set=db="$POSTGRES_DB" <<'SQL'
\getenv pw PGINIT_PASSWORD
SELECT :'user' = 'postgres' AS is_superuser \gset
\if :is_superuser
  ALTER ROLE postgres PASSWORD :'pw';
\else
  CREATE ROLE :"user" LOGIN PASSWORD :'pw';
\endif
SELECT :'db' <> 'postgres' AS create_db \gset
\if :create_db
  CREATE DATABASE :"db" OWNER :"user" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C';
\endif
SQL
  unset PGINIT_PASSWORD password
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  trap - ERR
  log "initialised"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' -c max_connections="$max_connections" "$@"
