#!/usr/bin/env bash
# Run the demo: SQLite and the local KMS in a throwaway folder, no service needed.
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" examples/demo.py "$@"
