#!/usr/bin/env bash
# Refuses to start the compose stack with missing, placeholder or weak secrets (`make stack-check`, `make stack-up`).
#
#   docker/check-env.sh [ENV_FILE]      # default: .env next to docker-compose.yml
#
# Checks POSTGRES_PASSWORD, MLFLOW_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY: each must be set, differ from
# the `change-me` placeholder of .env.example (and from every other known default), and have at least 12 characters
# (MLflow's own minimum for a user's password). The file is parsed, never sourced. Prints one line per problem and
# exits 2 when there is any; prints nothing and exits 0 otherwise.
set -euo pipefail

env_file="${1:-$(dirname "${BASH_SOURCE[0]}")/../.env}"
if [[ ! -f "${env_file}" ]]; then
  echo "check-env: ${env_file} not found: cp .env.example .env and set its passwords" >&2
  exit 2
fi

value_of() {  # last KEY=VALUE assignment of $1 in the file, surrounding quotes removed
  local line v=""
  while IFS= read -r line || [[ -n "${line}" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line#export }"
    if [[ "${line}" == "$1="* ]]; then
      v="${line#"$1="}"
      v="${v%"${v##*[![:space:]]}"}"
      if [[ "${v}" =~ ^\"(.*)\"$ || "${v}" =~ ^\'(.*)\'$ ]]; then v="${BASH_REMATCH[1]}"; fi
    fi
  done < "${env_file}"
  printf '%s' "${v}"
}

status=0
for key in POSTGRES_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  v="$(value_of "${key}")"
  lower="$(printf '%s' "${v}" | tr '[:upper:]' '[:lower:]')"
  case "${lower}" in
    "") echo "check-env: ${key} is not set in ${env_file}" >&2; status=2 ;;
    change-me | changeme | password | password1234 | admin | admin1234 | mlflow | postgres | secret)
      echo "check-env: ${key} in ${env_file} is a placeholder or default: set a real secret (openssl rand -base64 24)" >&2
      status=2 ;;
    *) if (( ${#v} < 12 )); then
         echo "check-env: ${key} in ${env_file} is shorter than 12 characters" >&2; status=2
       fi ;;
  esac
done
exit "${status}"
