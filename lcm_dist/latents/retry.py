"""Retrying transient storage errors with bounded exponential backoff.

An object store fails now and then in ways that go away by themselves: a dropped or refused
connection, a timeout, an HTTP 5xx (500 InternalError, 503 SlowDown / ServiceUnavailable), a
throttling reply. Every chunk read and write of the latent store, the write of its slot table,
opening it, and the writes of an export go through ``RetryPolicy.call``, which repeats such an
operation after waits that double from ``first_backoff`` up to ``max_backoff`` (each times a
random factor in [0.5, 1], so that many processes hit by the same outage do not retry in
lockstep), and gives up after ``retries`` retries or once the next wait would end more than
``seconds`` after the first attempt began. Giving up raises ``StoreUnavailableError``: one
sentence naming the operation, the URL and the last cause.

Only transient errors are retried (``is_transient``). Not found, permission denied, a full
disk, an invalid request or anything unrecognised is raised at once: repeating it cannot help,
and "not found" for data that must exist is damage to report, not to wait out.

Retrying is safe because every retried operation is idempotent: a chunk write goes to the slot
the committed table does not point at (shadow paging), so writing it again, or after a failed
attempt that did reach the store, only replaces uncommitted bytes with the same bytes; the slot
table and an export's arrays and files are whole-object overwrites with the same content; reads
change nothing.

Why a wrapper here rather than only s3fs's or botocore's own retrying: it works for every
fsspec backend (s3, gcs, a network file system); it is bounded by time as well as attempts,
with waits long enough to ride out an outage of a minute (s3fs's own retries wait 0.1-0.8 s,
about 2 s in all, and only for some errors; botocore's stop after a number of attempts); and
when it gives up the error says which chunk of which store. For s3:// URLs ``store_options``
makes the layers below short and predictable: botocore does not retry by itself (one layer
owns the policy) and connections and reads time out, so no request can hang for ever.
"""

from __future__ import annotations

import errno
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15}
"""Seconds to connect and to wait for each read of a response on s3:// (s3fs's own defaults,
set explicitly so that they hold whatever s3fs version is installed)."""

OPEN_RETRY_SECONDS = 15.0
"""Opening a store retries for at most this many seconds: a store that cannot be reached at
the start is more often a wrong URL or endpoint than an outage, and nothing is lost yet."""

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",  # s3fs's translation of HTTP 503 (SlowDown, ServiceUnavailable) and 409
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EPIPE",
        "EREMOTEIO",  # s3fs's translation of HTTP 500 InternalError
    )
    if hasattr(errno, name)
)

_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)

_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)


def _causes(err: BaseException):
    """``err`` and the errors it was raised from (s3fs raises an OSError from botocore's).
    Only explicit causes: an error raised while handling a transient one is not transient."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__


def _optional_types(module: str, names: tuple[str, ...]) -> tuple[type, ...]:
    """Exception classes of an optional backend library, if it is already imported (a backend
    that is not imported cannot have raised them)."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, n) for n in names if mod is not None and hasattr(mod, n))


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is a storage error that may go away if the operation is repeated."""
    for e in _causes(err):
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)):  # builtins: refused, reset, ...
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        # botocore: connection errors (refused, connect timeout) and HTTP-level ones (dropped
        # connection, read timeout); a response that does not parse is how some throttling
        # replies arrive (s3fs retries those too).
        botocore = _optional_types(
            "botocore.exceptions", ("ConnectionError", "HTTPClientError", "ResponseParserError")
        )
        aiohttp = _optional_types("aiohttp", ("ClientConnectionError", "ClientPayloadError"))
        fsspec = _optional_types("fsspec.exceptions", ("FSTimeoutError",))
        if isinstance(e, botocore + aiohttp + fsspec):
            return True
        response = getattr(e, "response", None)  # botocore ClientError: the service's reply
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code", "")
            return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES
    return False


def reason(err: BaseException) -> str:
    """Why an operation failed, on one line: the error's type and first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def plain_reason(err: Exception) -> str:
    """Why an operation on a store failed, in a few words: the system's message for OS errors
    ("permission denied", "no space left on device"), else the error's type and first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:1].lower() + err.strerror[1:]
    return reason(err)


class StoreIOError(RuntimeError):
    """Reading or writing the latent store failed."""


class StoreUnavailableError(StoreIOError):
    """A store operation kept failing with transient errors until its retries ran out."""

    def __init__(self, what: str, url: str, attempts: int, seconds: float, cause: BaseException):
        self.url = url
        super().__init__(
            f"{what} {url} failed {attempts} time(s) over {seconds:.0f} s, the last time with "
            f"{reason(cause)}; the store is not answering: check that it is reachable, then "
            "re-run the command (training resumes from its last checkpoint)"
        )


def _now() -> float:
    return time.monotonic()


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _sleep(seconds: float, stop: threading.Event | None) -> None:
    if stop is None:
        time.sleep(seconds)
    else:
        stop.wait(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a failing store operation is retried (see the module docstring)."""

    retries: int = 10
    seconds: float = 120.0
    first_backoff: float = 0.5
    max_backoff: float = 20.0

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0-based), in seconds."""
        cap = min(self.max_backoff, self.first_backoff * 2.0**retry)
        return cap * random.uniform(0.5, 1.0)

    def opening(self) -> RetryPolicy:
        """The policy for opening a store: the same, within ``OPEN_RETRY_SECONDS``."""
        return RetryPolicy(
            self.retries,
            min(self.seconds, OPEN_RETRY_SECONDS),
            self.first_backoff,
            self.max_backoff,
        )

    def call(
        self,
        op: Callable[[], T],
        what: str,
        url: str,
        *,
        on_retry: Callable[[BaseException], None] | None = None,
        stop: threading.Event | None = None,
    ) -> T:
        """``op()``, repeated while it fails with a transient error and the bounds allow.

        ``what`` and ``url`` name the operation in the error ("writing chunk 3 of latent
        store", "s3://bucket/latents.zarr"); ``on_retry`` is told of each error that will be
        retried; once ``stop`` is set no further attempt is made."""
        start = _now()
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except Exception as err:
                if not is_transient(err):
                    raise
                last = err
            wait = self.backoff(attempt - 1)
            elapsed = _now() - start
            if attempt > self.retries or elapsed + wait > self.seconds or _stopped(stop):
                raise StoreUnavailableError(what, url, attempt, elapsed, last) from last
            if on_retry is not None:
                on_retry(last)
            _sleep(wait, stop)
            if _stopped(stop):
                raise StoreUnavailableError(what, url, attempt, _now() - start, last) from last


def store_options(url: str, options: dict | None) -> dict | None:
    """The fsspec options to open ``url`` with: for s3:// the user's, plus connect and read
    timeouts (``S3_TIMEOUTS``) and no botocore-level retries where the user gives none of
    their own, so that one attempt cannot hang and ``RetryPolicy`` alone decides how long
    to keep trying. file:// makes missing directories, as a plain path does (fsspec's local
    filesystem does not by default). Other URLs: the user's options unchanged."""
    if url.startswith("file://"):
        return {"auto_mkdir": True, **(options or {})}
    if not url.startswith(("s3://", "s3a://")):
        return options or None
    options = dict(options or {})
    config = dict(options.get("config_kwargs") or {})
    for key, value in S3_TIMEOUTS.items():
        config.setdefault(key, value)
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
    options["config_kwargs"] = config
    return options


class StallWarner:
    """Warns, on stderr, while a step waits on the store: after ``every`` seconds of one wait
    and again every as many seconds, naming what it waits for, the store and its last error."""

    def __init__(self, store, every: float | None):
        self.store, self.every = store, every
        self._wait = (0.0, 0.0)  # (the wait's start, the next warning's time)

    def check(self, began: float, what: str, doing: str) -> None:
        """Called while waiting since ``began`` (``time.monotonic``) for ``what``."""
        if not self.every:
            return
        first, due = self._wait
        if first != began:
            first, due = began, began + self.every
        now = time.monotonic()
        if now >= due:
            self._warn(now - began, what, doing)
            due = now + self.every
        self._wait = (first, due)

    def _warn(self, waited: float, what: str, doing: str) -> None:
        last = self.store.last_error
        if last is not None and time.monotonic() - last[0] < waited + 1.0:
            news = f"the store's last error, {time.monotonic() - last[0]:.0f} s ago: {last[1]}"
        else:
            news = "no error from the store yet: it is slow or not answering"
        print(
            f"lcm-dist: waiting {waited:.0f} s for {what} of latent store {self.store.url} "
            f"({doing}; {news}); retrying for up to {self.store.retry.seconds:.0f} s before "
            "stopping",
            file=sys.stderr,
            flush=True,
        )
