"""Run a re-encryption job that stops after its first batch, for the kill drills.

Usage: python -m tests.reencrypt_pause_worker URL KEY_FILE JOB_NAME BATCH_SIZE

After the first committed batch it prints ``paused`` and waits for stdin to
close, holding its worker slot, so the parent can look at the job while it
is live and then kill the process at a known point.
"""

from __future__ import annotations

import sys

import sqlalchemy as sa

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import ReencryptionJob, ReencryptionProgress

from .rotation_support import Base


def main() -> int:
    url, key_file, job_name, batch_size = sys.argv[1:5]
    engine = sa.create_engine(url)
    Keyring(engine, LocalKms(key_file))

    def pause(progress: ReencryptionProgress) -> None:
        print("paused", flush=True)
        sys.stdin.read()

    ReencryptionJob(
        engine,
        Base,
        tables=["persons"],
        batch_size=int(batch_size),
        job_name=job_name,
        progress=pause,
    ).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
