"""``JWT_KEYS_FILE`` on disk: read at start, re-read when it changes.

The parsing is the core's (``core.jwt_keys``); this reader only looks at the file, at
most once per ``check_interval_s`` (a handshake costs one clock read, not one ``stat``),
and re-reads it when its modification time, size or inode changed (an editor's
rename-into-place included). A file that cannot be read or parsed at start stops the
gateway with the reason; later, the last good keys stay in use and the problem is
logged, so an operator's half-written edit locks nobody out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from magi_gateway.core.jwt_keys import EMPTY_KEYS, KeyFileError, KeySet, parse_keys

__all__ = ["KeyFile"]

logger = logging.getLogger(__name__)

#: A key file larger than this is refused (a JWK Set of a few hundred keys is far smaller).
MAX_KEY_FILE_BYTES = 1024 * 1024


class KeyFile:
    """The key set of one file, kept current."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._keys = EMPTY_KEYS
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = clock()
        if self.path is not None:
            stamp = self._stat()
            self._keys = self._read()  # raises: a gateway does not start with unusable keys
            self._stamp = stamp

    def current(self) -> KeySet:
        """The keys, re-read first if the file changed (looked at once per interval)."""
        if self.path is None:
            return self._keys
        now = self._clock()
        if now - self._checked_at < self.check_interval_s:
            return self._keys
        self._checked_at = now
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._keys = self._read()
                self._stamp = stamp
                logger.info("JWT keys re-read from %s: %d keys", self.path, len(self._keys.keys))
        except (OSError, KeyFileError) as exc:
            logger.warning("JWT_KEYS_FILE %s: %s; keeping the previous keys", self.path, exc)
        return self._keys

    def _stat(self) -> tuple[int, int, int]:
        assert self.path is not None
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> KeySet:
        assert self.path is not None
        with self.path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes")
        try:
            return parse_keys(data)
        except KeyFileError as exc:
            raise KeyFileError(f"JWT_KEYS_FILE {self.path}: {exc}") from exc
