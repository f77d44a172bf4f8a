#!/bin/sh
# Runs once, when the official postgres image initialises an empty data directory: a login
# for Grafana that can read the dashboard views and nothing else. The schema is made here,
# owned by the application role, so the views its migration creates there later are
# readable by Grafana at once (a view reads its tables with its owner's rights).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v owner="$POSTGRES_USER" -v password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'password';
CREATE SCHEMA dashboard AUTHORIZATION :"owner";
GRANT USAGE ON SCHEMA dashboard TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA dashboard
    GRANT SELECT ON TABLES TO grafana_reader;
SQL
