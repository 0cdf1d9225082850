"""One training process per run directory: RUN/.lock, stale locks of dead processes taken over."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from ddpmlab.errors import DDPMError

LOCK_FILE = ".lock"


def _proc_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux /proc, field 22), to detect a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: Optional[str]) -> bool:
    """Is process ``pid`` (the one that started at ``started``) still running on this host?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process: assume alive, the user decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped: it will never write again
            return False
    except (OSError, IndexError):
        pass
    now = _proc_start_time(pid)
    return not (started and now and now != started)  # same pid, other process: the holder is gone


class RunLock:
    """Exclusive ownership of a run directory for one training process.

    ``with RunLock(run_dir): ...`` makes ``run_dir/.lock`` appear atomically with its content,
    JSON ``{pid, host, started, since}`` (written to a temporary file first, then hard-linked into
    place, which fails if a lock exists); a live holder makes it raise :class:`DDPMError`; a
    holder that is gone (same host, pid dead or reused) is reported through ``say`` and replaced.
    It fails closed: a lock it cannot read, or cannot put back, is never taken over.
    The lock is removed on exit, if it is still ours, and so is the directory if the
    lock created it and nothing else was written there (a run that failed before it started).
    """

    def __init__(self, run_dir, enabled: bool = True, say: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.enabled = enabled
        self.say = say
        self.created_dir = False
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _proc_start_time(os.getpid()),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.release()

    def acquire(self) -> None:
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                return
            self._handle_existing()
        raise DDPMError(f"could not take the lock {self.path}: other processes keep creating it; "
                        "make sure only one `ddpm train` uses this run")

    def _create(self) -> bool:
        """Make the lock appear with its content, or return False when one exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.new")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.record))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and fails if a lock exists: never an empty lock
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> tuple[str, Optional[dict]]:
        for _ in range(20):  # a holder that just created the file may still be writing it
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return "", {}
            try:
                return text, json.loads(text)
            except ValueError:
                time.sleep(0.05)
        return text, None

    def _handle_existing(self) -> None:
        text, holder = self._read()
        if holder == {}:  # vanished meanwhile: try again
            return
        run = self.path.parent
        if holder is None:  # unreadable: never taken over (a live trainer may hold it)
            raise DDPMError(f"run '{run}' has a lock that cannot be read ({self.path}: {text[:40]!r}); if no "
                            f"`ddpm train` uses this run any more, delete {self.path} and try again")
        else:
            pid, host = holder.get("pid"), holder.get("host")
            who = f"pid {pid} on host {host} (since {holder.get('since', '?')})"
            if host != socket.gethostname():
                raise DDPMError(f"run '{run}' is locked by {who}, another machine; if no `ddpm train` runs "
                                f"there any more, delete {self.path} and try again")
            if _pid_alive(pid, holder.get("started")):
                raise DDPMError(f"run '{run}' is in use by another `ddpm train` ({who}); wait for it to finish "
                                f"or stop it (Ctrl-C / kill {pid} saves a checkpoint) before resuming")
            self.say(f"note: taking over the stale lock of '{run}' left by {who}: that process is gone")
        self._remove_if_unchanged(text)

    def _remove_if_unchanged(self, text: str) -> None:
        """Delete the stale lock, unless another process replaced it since we read it (then put it back)."""
        grabbed = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
        try:
            os.rename(self.path, grabbed)
        except FileNotFoundError:
            return
        if grabbed.read_text() == text:
            grabbed.unlink()
            return
        try:  # a fresh lock of a live process: it must be there again before anyone goes on
            os.link(grabbed, self.path)
        except FileExistsError:
            raise DDPMError(f"run '{self.path.parent}': several processes are taking its lock at once; "
                            "start one `ddpm train` at a time") from None
        except OSError:  # no hard links here: move it back
            os.rename(grabbed, self.path)
        grabbed.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
                if self.created_dir:
                    self.path.parent.rmdir()  # only if empty: a run that wrote nothing leaves no folder
        except (OSError, ValueError):
            pass
