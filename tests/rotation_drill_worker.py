"""Run one re-encryption job as a separate process, for the kill -9 drill.

Usage: python -m tests.rotation_drill_worker URL KEY_FILE BATCH_SIZE

Prints ``progress <values re-encrypted>`` after every committed batch and
``done <status>`` at the end, flushing each line so the parent can kill the
process at a chosen point.
"""

from __future__ import annotations

import sys

import sqlalchemy as sa

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import ReencryptionJob, ReencryptionProgress

from .rotation_support import Base


def main() -> int:
    url, key_file, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = sa.create_engine(url)
    Keyring(engine, LocalKms(key_file))

    def report(progress: ReencryptionProgress) -> None:
        print(f"progress {progress.values_reencrypted}", flush=True)

    result = ReencryptionJob(
        engine, Base, tables=["persons"], batch_size=batch_size, progress=report
    ).run()
    print(f"done {result.status}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
