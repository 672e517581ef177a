"""Request counts and latency histograms in the Prometheus text format (a few lines: no client library)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms expose them."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]


class Metrics:
    """Per route (the route's template, so ids in paths don't explode the label set) and status."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[method, route, status] += 1
            hist = self.latency.get((method, route))
            if hist is None:
                hist = self.latency[method, route] = Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def render(self, extra: list[str] = ()) -> str:
        with self._lock:
            lines = ["# HELP indexer_http_requests_total HTTP requests by method, route and status.",
                     "# TYPE indexer_http_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'indexer_http_requests_total{{method="{method}",route="{_esc(route)}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP indexer_http_request_duration_seconds Time from request to response.",
                      "# TYPE indexer_http_request_duration_seconds histogram"]
            for (method, route), hist in sorted(self.latency.items()):
                lines += hist.lines("indexer_http_request_duration_seconds",
                                    f'method="{method}",route="{_esc(route)}"')
        return "\n".join([*lines, *extra]) + "\n"


def _num(x: float) -> str:
    return repr(float(x))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
