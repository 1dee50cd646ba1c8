"""One run per store: ``jacrun submit`` holds a lease, a small object in the store.

The lease (``_lease.json`` at the store's root) names its holder: host, process id, start
time, and a heartbeat the holder's thread rewrites every :func:`heartbeat_seconds`. Another
run finds it and is refused, naming the holder, unless the lease is stale: its heartbeat is
older than :func:`stale_seconds` (``JACRUN_LEASE_STALE_SECONDS``, default 300), or its holder
ran on this host and is gone. A stale lease is taken over with a warning, so a killed run
never locks a store. Object stores have no atomic create: a new holder writes its lease,
waits :data:`SETTLE_SECONDS` and reads it back, and of two runs starting in the same instant
the one whose lease was overwritten gives way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from jacrun import location
from jacrun.errors import ConfigError
from jacrun.location import Location

KEY = "_lease.json"
SETTLE_SECONDS = 0.2
"""Wait between writing a lease and reading it back (two runs starting at once)."""
log = logging.getLogger("jacrun")


def stale_seconds() -> float:
    """Heartbeat age after which a lease is stale (``JACRUN_LEASE_STALE_SECONDS``, default 300)."""
    return float(os.environ.get("JACRUN_LEASE_STALE_SECONDS", 300))


def heartbeat_seconds() -> float:
    """How often a holder refreshes its lease: a fifth of the stale age, at most 30 s."""
    return max(0.1, min(30.0, stale_seconds() / 5))


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    host: str
    pid: int
    started: str
    heartbeat: float
    """Seconds since the epoch of the last refresh."""
    token: str

    def age(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    def gone(self) -> bool:
        """Whether the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by someone else
            return False
        try:  # killed but not yet reaped by its parent: gone too
            return open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"  # noqa: SIM115
        except (OSError, IndexError):
            return False

    def describe(self) -> str:
        return (
            f"pid {self.pid} on host {self.host}, started {self.started}, "
            f"last heartbeat {self.age():.0f} s ago"
        )


def read(store) -> Holder | None:
    """The lease in a Zarr ``store``, or None (absent or unreadable: nobody holds it)."""
    data = location.get_bytes(store, KEY)
    if data is None:
        return None
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


class Lease:
    """This process's lease on the store at ``where``; use :func:`hold`."""

    def __init__(self, where: Location) -> None:
        self.where = where
        self.store = location.zarr_store(where)
        path = location.local_path(where)
        self._made = path if path is not None and not path.exists() else None
        """A folder the lease created: removed on release if nothing else was written into it."""
        self.token = secrets.token_hex(8)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _write(self) -> None:
        holder = Holder(socket.gethostname(), os.getpid(), self.started, time.time(), self.token)
        location.set_bytes(self.store, KEY, json.dumps(asdict(holder)).encode())

    def acquire(self) -> str | None:
        """Take the lease; ConfigError naming the holder when another live run has it.
        Returns a warning when a stale lease was taken over."""
        label = location.label(self.where)
        warning = None
        holder = read(self.store)
        if holder is not None and holder.token != self.token:
            if holder.gone():
                warning = f"took over the lease of a run that is gone ({holder.describe()})"
            elif holder.age() > stale_seconds():
                warning = f"took over a stale lease ({holder.describe()}): that run is presumed dead"
            else:
                raise ConfigError(self._busy(label, holder))
        self._write()
        time.sleep(SETTLE_SECONDS)
        holder = read(self.store)
        if holder is not None and holder.token != self.token:
            raise ConfigError(self._busy(label, holder))
        self._thread = threading.Thread(target=self._beat, name="jacrun-lease", daemon=True)
        self._thread.start()
        return warning

    @staticmethod
    def _busy(label: str, holder: Holder) -> str:
        return (
            f"output.store: {label} is in use by another jacrun run ({holder.describe()}); "
            f"wait for it to finish (a killed run's lease goes stale {stale_seconds():.0f} s after its "
            "last heartbeat)"
        )

    def refresh(self) -> None:
        """Rewrite the heartbeat (and the lease itself, if creating the store removed it)."""
        holder = read(self.store)
        if holder is not None and holder.token != self.token:
            if not self.lost:
                log.warning("lease on %s taken over by %s", location.label(self.where), holder.describe())
            self.lost = True
            return
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat is retried at the next one
                log.warning("could not refresh the lease on %s: %s", location.label(self.where), exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = read(self.store)
            if holder is not None and holder.token == self.token:
                location.delete(self.store, KEY)
        except Exception as exc:  # noqa: BLE001 - a lease left behind goes stale
            log.warning("could not release the lease on %s: %s", location.label(self.where), exc)
        if self._made is not None:
            with contextlib.suppress(OSError):  # not empty: the run wrote its store there
                self._made.rmdir()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
