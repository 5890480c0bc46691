"""``python -m sqlalchemy_encrypted``: the same command line as ``sqlalchemy-encrypted``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
