"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated from the event loop (requests) and from the scheduler thread (steps),
so every update takes a lock; gauges and the scheduler's counters are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quickdraft.batching import BatchScheduler, StepInfo

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative-bucket histogram with a sum and a count (fixed memory)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        total = 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            total += count
            le = "+Inf" if bound == math.inf else _number(bound)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {_number(self.sum)}")
        lines.append(f"{name}_count{braces} {self.count}")
        return lines


class ServerMetrics:
    """Everything ``/metrics`` reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scheduler: BatchScheduler | None = None
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.step_seconds = Histogram(STEP_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.step_rows = Histogram(BATCH_BUCKETS)
        self.disconnects = 0

    def bind(self, scheduler: BatchScheduler) -> None:
        self.scheduler = scheduler
        scheduler.on_step = self.on_step

    def on_step(self, info: StepInfo) -> None:
        with self._lock:
            self.step_seconds.observe(info.seconds)
            self.batch_size.observe(info.batch)
            self.step_rows.observe(info.rows)

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None and status == 200:
                self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def first_token(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.ttft.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def disconnected(self) -> None:
        with self._lock:
            self.disconnects += 1

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        with self._lock:
            metric("quickdraft_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [f'quickdraft_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())])
            metric("quickdraft_client_disconnects_total", "counter",
                   "Requests whose client went away before the end.",
                   [f"quickdraft_client_disconnects_total {self.disconnects}"])
            lines = []
            for endpoint, histogram in sorted(self.latency.items()):
                lines += histogram.render("quickdraft_request_latency_seconds", f'endpoint="{endpoint}"')
            metric("quickdraft_request_latency_seconds", "histogram",
                   "End-to-end latency of successful requests.", lines)
            lines = []
            for endpoint, histogram in sorted(self.ttft.items()):
                lines += histogram.render("quickdraft_time_to_first_token_seconds", f'endpoint="{endpoint}"')
            metric("quickdraft_time_to_first_token_seconds", "histogram",
                   "Time from request arrival to the first streamed text.", lines)
            metric("quickdraft_step_seconds", "histogram", "Duration of one batched verification forward.",
                   self.step_seconds.render("quickdraft_step_seconds"))
            metric("quickdraft_batch_size", "histogram", "Sequences per batched step.",
                   self.batch_size.render("quickdraft_batch_size"))
            metric("quickdraft_step_rows", "histogram", "Rows (padded) per batched verification forward.",
                   self.step_rows.render("quickdraft_step_rows"))
        scheduler = self.scheduler
        if scheduler is not None:
            stats = scheduler.stats
            counters = [
                ("quickdraft_sequences_admitted_total", "Requests that started decoding.", stats.admitted),
                ("quickdraft_sequences_finished_total", "Requests that decoded to the end.", stats.finished),
                ("quickdraft_sequences_cancelled_total", "Requests dropped because the client left.",
                 stats.cancelled),
                ("quickdraft_sequences_failed_total", "Requests that failed after submission.", stats.failed),
                ("quickdraft_prompt_tokens_total", "Prompt tokens of admitted requests.", stats.prompt_tokens),
                ("quickdraft_completion_tokens_total", "Completion tokens returned.", stats.completion_tokens),
                ("quickdraft_committed_tokens_total", "Tokens committed (accepted + bonus, EOS included).",
                 stats.committed_tokens),
                ("quickdraft_sequence_forwards_total", "Target forwards per sequence (prefill included).",
                 stats.sequence_forwards),
                ("quickdraft_batch_forwards_total", "Batched verification forwards.", stats.batch_forwards),
                ("quickdraft_drafted_tokens_total", "Draft tokens verified.", stats.drafted_tokens),
                ("quickdraft_accepted_tokens_total", "Draft tokens accepted.", stats.accepted_tokens),
            ]
            for name, help_text, value in counters:
                metric(name, "counter", help_text, [f"{name} {value}"])
            gauges = [
                ("quickdraft_tau", "Mean committed tokens per target forward per sequence, since start.",
                 stats.tau),
                ("quickdraft_queue_depth", "Requests waiting for a batch slot.", scheduler.queue_depth),
                ("quickdraft_active_sequences", "Sequences decoding now.", scheduler.active),
                ("quickdraft_max_batch", "Batch slots.", scheduler.max_batch),
                ("quickdraft_draft_budget", "Draft budget per sequence chosen for the last step.",
                 stats.last_budget),
            ]
            for name, help_text, value in gauges:
                metric(name, "gauge", help_text, [f"{name} {_number(value)}"])
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if math.isfinite(value) else ("+Inf" if value > 0 else "-Inf")
