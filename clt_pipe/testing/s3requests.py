"""Count the HTTP requests this process makes to S3: every request s3fs (through aiobotocore) sends, retries
included, whichever server answers (moto in the tests, radosgw or AWS in the benchmarks)."""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit


@dataclass
class RequestLog:
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) in the order sent
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, method: str, url: str) -> None:
        """A listing (a GET of the bucket with a prefix) is recorded as ``LIST`` of ``bucket?prefix``."""
        parts = urlsplit(url)
        method, path = method.upper(), parts.path
        query = parse_qs(parts.query)
        if method == "GET" and ("list-type" in query or path.strip("/").count("/") == 0):
            method, path = "LIST", f"{path}?{query.get('prefix', [''])[0]}"
        with self._lock:
            self.requests.append((method, path))

    def __len__(self) -> int:
        return len(self.requests)

    def by_method(self) -> dict[str, int]:
        return dict(collections.Counter(m for m, _ in self.requests))

    def reads(self) -> list[tuple[str, str]]:
        """Requests that change nothing (GET, HEAD, LIST)."""
        return [(m, p) for m, p in self.requests if m in ("GET", "HEAD", "LIST")]

    def repeated(self, method: str = "GET") -> dict[str, int]:
        """Paths requested more than once with ``method``: what a cache could have saved."""
        c = collections.Counter(p for m, p in self.requests if m == method)
        return {p: n for p, n in c.items() if n > 1}

    def summary(self) -> str:
        methods = ", ".join(f"{m} {n}" for m, n in sorted(self.by_method().items()))
        return f"{len(self)} requests ({methods})"


@contextlib.contextmanager
def count_s3_requests():
    """Yields a RequestLog that records every request sent while the block runs (all threads)."""
    from aiobotocore.endpoint import AioEndpoint

    log = RequestLog()
    original = AioEndpoint._send

    async def counted(self, request):
        log.add(request.method, request.url)
        return await original(self, request)

    AioEndpoint._send = counted
    try:
        yield log
    finally:
        AioEndpoint._send = original
