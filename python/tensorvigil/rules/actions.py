"""What happens when a rule fires: log, call back, POST a webhook, stop training.

Every action is a callable taking a :class:`~tensorvigil.rules.base.Finding`. Recording to the
run's ``findings.jsonl`` is not an action: the engine always does it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable, Optional

from ..errors import InvalidArgumentError
from .base import Finding

logger = logging.getLogger("tensorvigil")
findings_logger = logging.getLogger("tensorvigil.findings")


class Log:
    """Logs each finding on the ``tensorvigil.findings`` logger (fired: WARNING, others: INFO)."""

    def __call__(self, f: Finding) -> None:
        """Logs ``f``."""
        level = logging.WARNING if f.fired else logging.INFO
        if f.kind == "error":
            level = logging.ERROR
        findings_logger.log(level, "tensorvigil finding: %s", f)


class Callback:
    """Calls ``fn(finding)``; with ``fired_only`` (default) only for fired findings."""

    def __init__(self, fn: Callable[[Finding], Any], fired_only: bool = True) -> None:
        if not callable(fn):
            raise InvalidArgumentError(f"callback must be callable, got {fn!r}")
        self.fn = fn
        self.fired_only = fired_only

    def __call__(self, f: Finding) -> None:
        """Calls the function."""
        if f.fired or not self.fired_only:
            self.fn(f)


class StopTraining:
    """Requests a stop of training when a finding fires.

    Args:
        run_dir: The run: a ``stop_request.json`` is written into it, which the hooks of every
            rank honour at their next step boundary.
        request: Alternatively (in-process), a function called with the reason, e.g. a
            hook's ``request_stop``.

    """

    def __init__(self, run_dir: Optional[str] = None, request: Optional[Callable] = None) -> None:
        if run_dir is None and request is None:
            raise InvalidArgumentError("StopTraining needs run_dir or request")
        self.run_dir = run_dir
        self.request = request
        self.requested = False

    def __call__(self, f: Finding) -> None:
        """Requests the stop (once)."""
        if not f.fired or self.requested:
            return
        self.requested = True
        reason = f"{f.rule} fired at step {f.step}: {f.message}"
        if self.request is not None:
            self.request(reason)
        else:
            from ..hooks.base import write_stop_request

            write_stop_request(self.run_dir, reason, source=f"rule {f.rule}")


class Webhook:
    """POSTs each fired finding as JSON to ``url`` from a background thread.

    Training and rule evaluation never wait for the server: findings are queued (at most
    ``max_queue``; beyond that they are dropped and counted) and each request has a timeout.

    Args:
        url: ``http://`` or ``https://`` URL.
        timeout: Seconds per request.
        headers: Extra HTTP headers.
        max_queue: Bound of the queue of unsent findings.
        fired_only: Only send fired findings.

    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        headers: Optional[dict] = None,
        max_queue: int = 1000,
        fired_only: bool = True,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidArgumentError(f"webhook url must start with http:// or https://: {url!r}")
        self.url = url
        self.timeout = float(timeout)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.fired_only = fired_only
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: Optional[threading.Thread] = None
        # Imported here, at set-up: importing urllib.request loads OpenSSL, which holds the GIL
        # for a while; done by the sender thread, it stalled the first rule step (~0.5 s).
        import urllib.request

        self._urlopen = urllib.request.urlopen
        self._request = urllib.request.Request

    def __call__(self, f: Finding) -> None:
        """Queues ``f`` for sending."""
        if self.fired_only and not f.fired:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tv-webhook", daemon=True)
            self._thread.start()
        try:
            self._q.put_nowait(f.to_json())
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        while True:
            doc = self._q.get()
            if doc is None:
                self._q.task_done()
                return
            try:
                req = self._request(
                    self.url, data=json.dumps(doc).encode(), headers=self.headers, method="POST"
                )
                with self._urlopen(req, timeout=self.timeout) as resp:
                    resp.read(1 << 16)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - a dead endpoint must not matter
                self.failed += 1
                if self.failed == 1:
                    logger.warning("tensorvigil: webhook %s failed: %s", self.url, e)
            finally:
                self._q.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits (at most ``timeout`` s) for queued findings to be sent; True when all were."""
        import time

        end = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return self._q.unfinished_tasks == 0
