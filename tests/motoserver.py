"""Start moto's standalone server on 127.0.0.1 for the AWS KMS tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

__all__ = ["running_moto_server"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_moto_server() -> Iterator[str]:
    """Run ``python -m moto.server`` on a free loopback port; yield its URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"moto[server] is required in CI: {exc}")
        pytest.skip(f"moto[server] is not installed: {exc}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None:
                pytest.fail(f"moto server exited with code {process.returncode} on start")
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on {url} within {_START_TIMEOUT} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
