#!/usr/bin/env bash
# Run the whole test suite on SQLite and on a private PostgreSQL cluster.
# Extra arguments go to pytest, for example: scripts/test.sh -k keyring
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
