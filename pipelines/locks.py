"""One writer per stage output on a machine: an advisory lock per output dir, held while a step checks and runs.

A killed orchestrator can leave a step process and its stage running (they are not in the killed process); a
rerun must not start a second writer into the same directory. The lock is a ``flock`` on a local file named
after the output URL (S3 roots included), so the kernel releases it when the holder dies, however it dies.
"""
import contextlib
import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_DIR_ENV = "SFD_LOCK_DIR"
DEFAULT_LOCK_DIR = Path.home() / ".cache" / "sfd-pipeline" / "locks"


class StageBusyError(RuntimeError):
    """Another live process on this machine is writing the same stage output."""


def lock_path(out_url: str) -> Path:
    directory = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{hashlib.sha256(out_url.encode()).hexdigest()[:32]}.lock"


@contextlib.contextmanager
def exclusive_output(out_url: str) -> Iterator[None]:
    """Hold the output's lock, or raise ``StageBusyError`` naming the process that holds it."""
    with open(lock_path(out_url), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            raise StageBusyError(
                f"{out_url} is being written by {holder}, probably left running by an earlier run that was "
                f"killed; wait for it to finish (then this is cached) or stop that process and its stage "
                f"subprocess, then rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
