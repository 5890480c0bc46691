"""The only module that calls cryptography's AEAD primitives.

AES-256-GCM takes a 32-byte key and a fresh random 96-bit nonce from
``os.urandom`` for every value. AES-256-SIV takes a 64-byte key (two
AES-256 keys, as RFC 5297 defines it) and needs no nonce, which is what makes
it deterministic.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from .envelope import GCM_NONCE_SIZE, Algorithm

__all__ = ["KEY_SIZES", "AeadCipher", "InvalidTag", "new_cipher", "new_gcm_nonce"]

KEY_SIZES = {Algorithm.AES_256_GCM: 32, Algorithm.AES_256_SIV: 64}


class AeadCipher:
    """A ready AEAD object for one DEK; build once per key and reuse it.

    Building ``AESGCM`` or ``AESSIV`` per value costs about as much as the
    encryption itself, so the DEK cache keeps these objects.
    """

    __slots__ = ("_gcm", "_siv", "algorithm")

    def __init__(self, algorithm: Algorithm, key: bytes) -> None:
        if len(key) != KEY_SIZES[algorithm]:
            raise ValueError(
                f"{algorithm.name} needs a {KEY_SIZES[algorithm]}-byte key, got {len(key)} bytes"
            )
        self.algorithm = algorithm
        self._gcm = AESGCM(key) if algorithm is Algorithm.AES_256_GCM else None
        self._siv = AESSIV(key) if algorithm is Algorithm.AES_256_SIV else None

    def __repr__(self) -> str:
        return f"<AeadCipher {self.algorithm.name}>"

    def __reduce__(self) -> str:
        raise TypeError("AeadCipher holds key material and cannot be pickled")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt ``plaintext``; returns nonce|ciphertext|tag for GCM and
        SIV|ciphertext for SIV."""
        if self._gcm is not None:
            nonce = new_gcm_nonce()
            return nonce + self._gcm.encrypt(nonce, plaintext, aad)
        assert self._siv is not None
        return self._siv.encrypt(plaintext, [aad])

    def raw_encrypt(self) -> Callable[..., bytes]:
        """Return the primitive's own ``encrypt``: ``(nonce, data, aad)`` for
        GCM, with a nonce from :func:`new_gcm_nonce`, and ``(data, [aad])``
        for SIV.

        For the column types' write path, which builds the envelope itself
        to save a Python call per value.
        """
        if self._gcm is not None:
            return self._gcm.encrypt
        assert self._siv is not None
        return self._siv.encrypt

    def raw_decrypt(self) -> Callable[..., bytes]:
        """Return the primitive's own ``decrypt``: ``(nonce, data, aad)`` for
        GCM and ``(data, [aad])`` for SIV.

        For the column types' read path, which slices the envelope itself to
        save a Python call per value.
        """
        if self._gcm is not None:
            return self._gcm.decrypt
        assert self._siv is not None
        return self._siv.decrypt

    def open(self, body: bytes, aad: bytes) -> bytes:
        """Decrypt the part after the header; raises ``InvalidTag`` on any mismatch."""
        if self._gcm is not None:
            return self._gcm.decrypt(body[:GCM_NONCE_SIZE], body[GCM_NONCE_SIZE:], aad)
        assert self._siv is not None
        return self._siv.decrypt(body, [aad])

    def open_at(self, envelope: bytes, offset: int, aad: bytes) -> bytes:
        """Decrypt the body that starts at ``offset`` of ``envelope``.

        Does what ``open(envelope[offset:], aad)`` does with one copy less;
        raises ``InvalidTag`` on any mismatch.
        """
        if self._gcm is not None:
            nonce_end = offset + GCM_NONCE_SIZE
            return self._gcm.decrypt(envelope[offset:nonce_end], envelope[nonce_end:], aad)
        assert self._siv is not None
        return self._siv.decrypt(envelope[offset:], [aad])


# Returns a fresh random 96-bit GCM nonce from the operating system's CSPRNG.
# A partial rather than a function: column types call it once per value.
new_gcm_nonce: Callable[[], bytes] = functools.partial(os.urandom, GCM_NONCE_SIZE)


def new_cipher(algorithm: Algorithm, key: bytes) -> AeadCipher:
    return AeadCipher(algorithm, key)
