"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from dreamlm.serve.app import Run, Served


class ServeMetrics:
    """Requests by status, queue depth, active requests, batch rows and latency per step, tokens and tokens/s."""

    def __init__(self, models: "dict[str, Served]") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dreamlm_requests", "Finished requests by model and outcome",
                                ["model", "outcome"], registry=r)
        self.step_seconds = Histogram("dreamlm_step_seconds", "Wall time of one batched denoising step", ["model"],
                                      registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_rows = Histogram("dreamlm_batch_rows", "Canvas rows in one batched step", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("dreamlm_generated_tokens", "Tokens of finished requests", ["model"], registry=r)
        queue = Gauge("dreamlm_queue_depth", "Requests waiting to join the batch", ["model"], registry=r)
        active = Gauge("dreamlm_active_requests", "Requests in the running batch", ["model"], registry=r)
        rate = Gauge("dreamlm_tokens_per_second", "Tokens of requests finished in the last 10 s, per second", ["model"],
                     registry=r)
        for name, served in models.items():
            engine = served.engine
            queue.labels(name).set_function(lambda e=engine: e.queue_depth)
            active.labels(name).set_function(lambda e=engine: e.active)
            rate.labels(name).set_function(lambda e=engine: e.tokens_per_second())

    def observe_step(self, model: str, seconds: float, rows: int, committed: int) -> None:
        """Called by an engine after each step."""
        self.step_seconds.labels(model).observe(seconds)
        self.batch_rows.labels(model).observe(rows)
        self.tokens.labels(model).inc(committed)

    def observe_request(self, model: str, run: "Run", outcome: str | None = None) -> None:
        """Count a finished request (outcome: ok, or why it did not finish: disconnected (the client left),
        timeout, shutdown, error; default: the run's own)."""
        outcome = outcome or run.outcome
        if outcome is None:
            outcome = "ok" if all(job.state.done for job in run.jobs) else "failed"
        self.requests.labels(model, outcome).inc()

    def render(self) -> tuple[Any, str]:
        """The Prometheus text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
