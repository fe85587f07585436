#!/usr/bin/env bash
# Create one database and one role per service on the compose PostgreSQL server.
#
# The official postgres image runs this once, on the first start with an empty data
# directory (/docker-entrypoint-initdb.d). Changing it later has no effect on an existing
# volume: `docker compose down -v` deletes the data and the next `up` runs it again.
#
#   database            owner (role)        holds (orders_project/db_routers.py)
#   saga_default        app                 auth, admin, sessions, API tokens, Celery results, beat
#   saga_orders         orders_svc          orders, and the saga store (routed beside the orders)
#   saga_inventory      inventory_svc       inventory
#   saga_payments       payments_svc        payments
#   saga_notifications  notifications_svc   notifications
#
# The owners are for `migrate` only (compose's migrate job). Every running process logs in
# as a role of its own that owns nothing: web, beat, orders_worker (the orders and saga
# workers), inventory_worker, payments_worker, notifications_worker (Flower: none).
#
# Least privilege: CONNECT is revoked from PUBLIC on every database (and on the `postgres`
# and `template1` maintenance databases), so an owner can connect to its own database only,
# and a process role to nothing until `migrate`, as each owner, grants it CONNECT and its
# table privileges (orders_project/db_roles.py: POLICY, applied by common's migrate command
# after every migration, so tables created later are covered too).
#
# Passwords come from the environment that docker-compose.yml gives the postgres service
# (local defaults there, overridden from .env). psql quotes them itself (:'var'), so any
# character is safe in SQL; keep them URL-safe all the same, since compose also puts them
# in the DATABASE_URLs.
set -euo pipefail

: "${APP_DB_PASSWORD:?APP_DB_PASSWORD must be set}"
: "${ORDERS_DB_PASSWORD:?ORDERS_DB_PASSWORD must be set}"
: "${INVENTORY_DB_PASSWORD:?INVENTORY_DB_PASSWORD must be set}"
: "${PAYMENTS_DB_PASSWORD:?PAYMENTS_DB_PASSWORD must be set}"
: "${NOTIFICATIONS_DB_PASSWORD:?NOTIFICATIONS_DB_PASSWORD must be set}"
: "${WEB_DB_PASSWORD:?WEB_DB_PASSWORD must be set}"
: "${BEAT_DB_PASSWORD:?BEAT_DB_PASSWORD must be set}"
: "${ORDERS_WORKER_DB_PASSWORD:?ORDERS_WORKER_DB_PASSWORD must be set}"
: "${INVENTORY_WORKER_DB_PASSWORD:?INVENTORY_WORKER_DB_PASSWORD must be set}"
: "${PAYMENTS_WORKER_DB_PASSWORD:?PAYMENTS_WORKER_DB_PASSWORD must be set}"
: "${NOTIFICATIONS_WORKER_DB_PASSWORD:?NOTIFICATIONS_WORKER_DB_PASSWORD must be set}"

# docker-compose.yml's defaults are public (this repository): every container on compose's
# network reaches this server, so a role with a known password is anyone's, and a
# superuser's is everything (COPY ... PROGRAM). Refused as the settings refuse a public
# SECRET_KEY: set your own in .env before the first `up` (docs/CONTAINERS.md).
for name in POSTGRES_PASSWORD APP_DB_PASSWORD ORDERS_DB_PASSWORD INVENTORY_DB_PASSWORD PAYMENTS_DB_PASSWORD \
    NOTIFICATIONS_DB_PASSWORD WEB_DB_PASSWORD BEAT_DB_PASSWORD ORDERS_WORKER_DB_PASSWORD \
    INVENTORY_WORKER_DB_PASSWORD PAYMENTS_WORKER_DB_PASSWORD NOTIFICATIONS_WORKER_DB_PASSWORD; do
    if printf '%s' "${!name:-}" | grep -qiE 'local-only|insecure|change-me'; then
        echo "refusing to create the roles: $name is a public default from this repository;" \
            "set your own in .env (docs/CONTAINERS.md), then docker compose down -v && docker compose up" >&2
        exit 1
    fi
done

psql --no-psqlrc --set ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}" \
    --set app_password="$APP_DB_PASSWORD" \
    --set orders_password="$ORDERS_DB_PASSWORD" \
    --set inventory_password="$INVENTORY_DB_PASSWORD" \
    --set payments_password="$PAYMENTS_DB_PASSWORD" \
    --set notifications_password="$NOTIFICATIONS_DB_PASSWORD" \
    --set web_password="$WEB_DB_PASSWORD" \
    --set beat_password="$BEAT_DB_PASSWORD" \
    --set orders_worker_password="$ORDERS_WORKER_DB_PASSWORD" \
    --set inventory_worker_password="$INVENTORY_WORKER_DB_PASSWORD" \
    --set payments_worker_password="$PAYMENTS_WORKER_DB_PASSWORD" \
    --set notifications_worker_password="$NOTIFICATIONS_WORKER_DB_PASSWORD" \
    <<'SQL'
CREATE ROLE app               LOGIN PASSWORD :'app_password';
CREATE ROLE orders_svc        LOGIN PASSWORD :'orders_password';
CREATE ROLE inventory_svc     LOGIN PASSWORD :'inventory_password';
CREATE ROLE payments_svc      LOGIN PASSWORD :'payments_password';
CREATE ROLE notifications_svc LOGIN PASSWORD :'notifications_password';
-- The process roles: no database, no table, no right of their own until `migrate` grants them.
CREATE ROLE web                  LOGIN PASSWORD :'web_password';
CREATE ROLE beat                 LOGIN PASSWORD :'beat_password';
CREATE ROLE orders_worker        LOGIN PASSWORD :'orders_worker_password';
CREATE ROLE inventory_worker     LOGIN PASSWORD :'inventory_worker_password';
CREATE ROLE payments_worker      LOGIN PASSWORD :'payments_worker_password';
CREATE ROLE notifications_worker LOGIN PASSWORD :'notifications_worker_password';

-- The owner may connect and, on PostgreSQL 15+, create tables in the database's public
-- schema (owned by pg_database_owner): that is all `migrate` needs.
CREATE DATABASE saga_default       OWNER app;
CREATE DATABASE saga_orders        OWNER orders_svc;
CREATE DATABASE saga_inventory     OWNER inventory_svc;
CREATE DATABASE saga_payments      OWNER payments_svc;
CREATE DATABASE saga_notifications OWNER notifications_svc;

REVOKE CONNECT, TEMPORARY ON DATABASE saga_default       FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE saga_orders        FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE saga_inventory     FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE saga_payments      FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE saga_notifications FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE postgres           FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE template1          FROM PUBLIC;
SQL
