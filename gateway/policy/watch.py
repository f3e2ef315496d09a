"""Hot reload: watch the policies directory and reload it, as one unit, once it settles.

The directory is polled (no extra dependency, works on every file system, containers
and ConfigMap symlink swaps included). Its fingerprint covers every policy file's name,
size, mtime and content hash. A change is applied only after the fingerprint has stayed
the same for the debounce time, so an editor's half-written save never becomes the
serving set; an invalid set is rejected whole by the reload itself, which keeps the
previous set, logs each problem as file:line:col and counts it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.policy.loader import policy_files

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, str], ...] | None


def fingerprint(directory: Path) -> Fingerprint:
    """What the set depends on; None when the directory cannot be listed."""
    try:
        entries = []
        for path in policy_files(directory):
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns, digest))
        return tuple(entries)
    except OSError:
        return None  # mid-rename or gone: compared like any other state, so it settles too


class PolicyWatcher:
    """Calls `reload` when the directory changed and then stayed unchanged for `debounce` s."""

    def __init__(
        self,
        directory: Path,
        reload: Callable[[], bool],
        *,
        debounce: float = 0.3,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._reload = reload
        self._debounce = debounce
        self._interval = interval
        self._clock = clock
        self._applied = fingerprint(directory)
        self._pending: Fingerprint = self._applied
        self._pending_since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise; the set in use stays
                log.exception("policy watch failed; the current policies stay in use")

    def poll(self) -> bool:
        """One look at the directory; True when it triggered a reload."""
        current = fingerprint(self.directory)
        now = self._clock()
        if current != self._pending:
            self._pending, self._pending_since = current, now  # still changing: wait
            return False
        if current == self._applied or now - self._pending_since < self._debounce:
            return False
        # Settled. Whatever the outcome, this state has been tried: a broken set is
        # reported once, not on every poll, and the next edit is tried afresh.
        self._applied = current
        self.reloads += 1
        log.info("policy directory %s changed; reloading", self.directory)
        self._reload()
        return True
