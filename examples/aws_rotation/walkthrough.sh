#!/usr/bin/env bash
# Rotate one tenant's data keys under AWS KMS, from `keys rotate` to `keys retire`.
#
# Needs:
#   SQLALCHEMY_ENCRYPTED_URL  the database, for example postgresql+psycopg://app@db/app
#   SQLALCHEMY_ENCRYPTED_KMS  aws-kms://<key ARN>?region=<region>
#   AWS credentials as boto3 finds them (environment, profile or instance role)
# Optional:
#   PYTHON                    the Python with sqlalchemy-encrypted[aws] installed (python3)
#   SQLALCHEMY_ENCRYPTED_ACTIVE_KEY_TTL
#                             seconds a rotated key stays pending; use the application's
#                             Keyring(active_key_ttl=...) setting (60 by default)
#   RETIRE_WAIT               seconds version 1 must be inactive before `keys retire`
#                             takes its census (--min-inactive). The default is the
#                             active key TTL plus 60, as in `keys retire` itself
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
TENANT="acme-payroll"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export SQLALCHEMY_ENCRYPTED_MODELS="accounts:Base"
: "${SQLALCHEMY_ENCRYPTED_URL:?set SQLALCHEMY_ENCRYPTED_URL}"
: "${SQLALCHEMY_ENCRYPTED_KMS:?set SQLALCHEMY_ENCRYPTED_KMS to aws-kms://<key ARN>?region=...}"
TTL="${SQLALCHEMY_ENCRYPTED_ACTIVE_KEY_TTL:-60}"
RETIRE_WAIT="${RETIRE_WAIT:-$((TTL + 60))}"

step() { printf '\n## %s\n' "$*"; }
run() {
    printf '$ %s\n' "$*"
    "$@"
}
cli() { run "$PYTHON" -m sqlalchemy_encrypted "$@"; }

step "1. Create the keyring and checkpoint tables"
cli init

step "2. The application writes accounts; each tenant gets its DEKs from AWS KMS"
run "$PYTHON" "$HERE/accounts.py" write 1
cli keys list

step "3. Rotate the tenant's DEKs: version 2 is created pending"
cli keys rotate "$TENANT"

step "4. Activate version 2 once every process has seen it (after the active key TTL)"
if [ "$TTL" != "0" ]; then
    echo "waiting ${TTL} s, the active key TTL"
    sleep "$TTL"
fi
cli keys promote --tenant "$TENANT"
cli keys list --tenant "$TENANT"

step "5. New writes use version 2; the census shows the values still under version 1"
run "$PYTHON" "$HERE/accounts.py" write 2
cli status --tenant "$TENANT"

step "6. Retiring version 1 at once is rejected: processes may still write under it"
status=0
cli keys retire "$TENANT" 1 2>&1 || status=$?
if [ "$status" -ne 10 ]; then
    echo "expected exit status 10 (key version active too recently), got $status" >&2
    exit 1
fi

step "7. After the wait, retiring version 1 is rejected: values still use it"
if [ "$RETIRE_WAIT" != "0" ]; then
    echo "waiting ${RETIRE_WAIT} s, the active key TTL plus 60 s"
    sleep "$RETIRE_WAIT"
fi
status=0
cli keys retire "$TENANT" 1 --min-inactive "$RETIRE_WAIT" 2>&1 || status=$?
if [ "$status" -ne 5 ]; then
    echo "expected exit status 5 (key version still in use), got $status" >&2
    exit 1
fi

step "8. Re-encrypt the tenant's stale values under version 2"
cli reencrypt --tenant "$TENANT"
cli status --tenant "$TENANT" --fail-on-stale

step "9. Retire version 1: the census finds no value under it"
cli keys retire "$TENANT" 1 --min-inactive "$RETIRE_WAIT"
cli keys list --tenant "$TENANT"

step "10. The application reads every account and finds each by email"
run "$PYTHON" "$HERE/accounts.py" check
