"""Helpers of the data tests (imported by name; conftest.py holds only fixtures)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

OUTAGE_S = 1.0  # server down this long: inside the default retry window (~25-45 s), longer than one request


class StageThread:
    """Runs ``fn`` in a daemon thread (the stage in this process, so its retries see the server go away)."""

    def __init__(self, fn: Callable[[], Any]):
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._target, args=(fn,), daemon=True)
        self.thread.start()

    def _target(self, fn: Callable[[], Any]) -> None:
        try:
            self.outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            self.outcome["error"] = error

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"stage still running {timeout_s:.0f} s later"

    def result(self, timeout_s: float = 120) -> Any:
        self.join(timeout_s)
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["value"]

    def error(self, timeout_s: float = 120) -> BaseException:
        self.join(timeout_s)
        assert "error" in self.outcome, f"the stage finished: {str(self.outcome.get('value'))[:200]}"
        return self.outcome["error"]


def wait_for_object(server, url: str, stage: StageThread, timeout_s: float = 120) -> None:
    """Poll the server (plain boto3, not storage.fs) until ``s3://bucket/key`` exists."""
    prefix = f"s3://{server.bucket}/"
    assert url.startswith(prefix), url
    client = server.client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.head_object(Bucket=server.bucket, Key=url[len(prefix):])
            return
        except Exception:  # noqa: BLE001 - 404 until the stage writes it
            if not stage.alive():
                raise AssertionError(f"the stage ended before {url} appeared: {stage.outcome}")
            time.sleep(0.01)
    raise AssertionError(f"{url} did not appear within {timeout_s} s")


def outage_during(server, stage: StageThread, marker_url: str, down_s: float = OUTAGE_S) -> None:
    """Once ``marker_url`` exists, stop the server for ``down_s`` (the stage must still be running, retrying),
    then start it again."""
    wait_for_object(server, marker_url, stage)
    server.stop()
    try:
        time.sleep(down_s)
        assert stage.alive(), f"the stage finished while the server was down: {stage.outcome}"
    finally:
        server.start()
