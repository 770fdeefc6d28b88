"""A rules file re-read when it changes: the hot-reload tier shared by limits and risk rules.

Process settings are read once at boot; rules are re-read while the gateway serves. A bad or
unreadable file is counted and logged, and the rules in force are kept: a typo made during a
sale must never take the gateway down or drop every rule at once (envoyproxy/ratelimit's tiers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class RuleFile:
    """Polls one file; subclasses turn its text into rules in ``apply`` (ValueError: refused)."""

    #: what the file holds, for the log lines ("limits", "risk")
    kind = "rules"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reloads = 0
        self.reload_errors = 0
        self._mtime: float | None = None
        self._closed = False

    def apply(self, text: str) -> None:
        """Parse ``text`` and put its rules in force; raise ValueError, changing nothing."""
        raise NotImplementedError

    def maybe_reload(self) -> bool:
        """Re-read the file if it changed; on a bad or unreadable file keep the rules in force."""
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            if self._mtime is not None:
                self.reload_errors += 1
                log.error(
                    "%s file %s unreadable (%s); keeping the rules in force",
                    self.kind,
                    self.path,
                    exc,
                )
                self._mtime = None
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.apply(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.reload_errors += 1
            log.error(
                "%s file %s refused (%s); keeping the rules in force", self.kind, self.path, exc
            )
            return False
        self.reloads += 1
        log.info("%s rules loaded from %s", self.kind, self.path)
        return True

    def close(self) -> None:
        self._closed = True

    async def run(self, interval_s: float = 1.0) -> None:
        """Poll the file for changes until closed."""
        while not self._closed:
            await asyncio.sleep(interval_s)
            self.maybe_reload()
