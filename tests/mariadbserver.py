"""A private MariaDB server on loopback for the test session.

Like the PostgreSQL cluster of ``pgcluster.py``, the server's files live in
a temporary folder and belong to the ``mysql`` OS user when the tests run
as root. It listens on 127.0.0.1 only and runs without grant tables, so any
client on loopback connects as root with no password. Its data is thrown
away, so the redo log is not flushed at each commit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

__all__ = ["ServerUnavailable", "running_mariadb_server"]

_START_TIMEOUT = 60.0


class ServerUnavailable(RuntimeError):
    """No MariaDB server binaries were found on this machine."""


def _find(program: str) -> str:
    for folder in (None, "/usr/sbin", "/usr/bin"):
        found = shutil.which(program, path=folder)
        if found:
            return found
    raise ServerUnavailable(
        f"MariaDB server program {program} not found: install the Debian package mariadb-server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            # The server greets a new connection with its handshake packet.
            return bool(sock.recv(4))
    except OSError:
        return False


@contextlib.contextmanager
def running_mariadb_server() -> Iterator[str]:
    """Start a MariaDB server on a free loopback port; yield the URL of its
    ``mysql`` database for the PyMySQL driver."""
    install_db = _find("mariadb-install-db")
    server = _find("mariadbd")
    root = tempfile.mkdtemp(prefix="sqlalchemy-encrypted-mariadb-")
    datadir = os.path.join(root, "data")
    prefix: list[str] = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam("mysql")
        os.chmod(root, 0o755)
        os.makedirs(datadir, mode=0o700)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", "mysql", "--"]

    subprocess.run(
        [
            *prefix,
            install_db,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
    )

    port = _free_port()
    log_path = os.path.join(root, "server.log")
    process = subprocess.Popen(
        [
            *prefix,
            server,
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={os.path.join(root, 'server.sock')}",
            f"--pid-file={os.path.join(root, 'server.pid')}",
            f"--log-error={log_path}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--skip-grant-tables",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-buffer-pool-size=64M",
            "--max-connections=200",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(port):
            if process.poll() is not None:
                raise RuntimeError(
                    f"mariadbd exited with code {process.returncode} on start; see {log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mariadbd did not accept connections on 127.0.0.1:{port} within "
                    f"{_START_TIMEOUT} s; see {log_path}"
                )
            time.sleep(0.1)
        yield f"mysql+pymysql://root@127.0.0.1:{port}/mysql"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
