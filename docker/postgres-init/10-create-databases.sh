#!/usr/bin/env bash
# Creates the two databases of the scale-out topology on first start of the postgres container (the official image
# runs /docker-entrypoint-initdb.d/*.sh once, on an empty data volume, as the postgres superuser):
#   ${MLFLOW_DB}  MLflow tracking + model registry (the server runs its alembic migrations on start)
#   ${OPTUNA_DB}  Optuna RDB storage of the campaigns (never the MLflow database: both use `alembic_version`)
# Both belong to ${POSTGRES_USER}. Names and credentials come from .env (see .env.example), never from this file.
set -euo pipefail

: "${POSTGRES_USER:?POSTGRES_USER is not set (see .env.example)}"
: "${MLFLOW_DB:?MLFLOW_DB is not set (see .env.example)}"
: "${OPTUNA_DB:?OPTUNA_DB is not set (see .env.example)}"

for db in "${MLFLOW_DB}" "${OPTUNA_DB}"; do
  if [[ ! "${db}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "10-create-databases.sh: invalid database name '${db}' (letters, digits, underscore)" >&2
    exit 1
  fi
  exists="$(psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '${db}'")"
  if [[ "${exists}" != "1" ]]; then
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname postgres \
      -c "CREATE DATABASE \"${db}\" OWNER \"${POSTGRES_USER}\""
    echo "10-create-databases.sh: created database ${db}"
  fi
done
