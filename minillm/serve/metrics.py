"""What the server counts, for Prometheus (`GET /metrics`, its text format; every name starts `minillm_`).

| metric                                    | kind      | what                                                |
|-------------------------------------------|-----------|-----------------------------------------------------|
| `minillm_requests_running`                | gauge     | requests the scheduler is prefilling or decoding    |
| `minillm_requests_waiting`                | gauge     | requests queued, not admitted yet                   |
| `minillm_requests_total{finish_reason}`   | counter   | finished requests: stop, length, cancelled, error   |
| `minillm_prompt_tokens_total`             | counter   | prompt tokens of admitted requests                  |
| `minillm_generation_tokens_total`         | counter   | tokens generated                                    |
| `minillm_time_to_first_token_seconds`     | histogram | from the request's arrival to its first token       |
| `minillm_inter_token_latency_seconds`     | histogram | between two tokens of one request                   |
| `minillm_request_duration_seconds`        | histogram | from arrival to the last token (end to end)         |
| `minillm_decode_batch_size`               | histogram | sequences in each decode step                       |
| `minillm_kv_blocks_used`, `_total`        | gauge     | blocks of the KV pool holding a sequence's keys     |
| `minillm_prefix_cache_queries_total`      | counter   | prompt blocks looked up in the prefix cache         |
| `minillm_prefix_cache_hits_total`         | counter   | of those, found (their prefill was skipped)         |

Each server has its own registry, so several servers in one process (tests) do not collide.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets in seconds, from a fast decode step on a small model to a long prompt on a busy server.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's metrics in their own registry; the scheduler updates them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("minillm_requests_running", "Requests being prefilled or decoded", registry=r)
        self.waiting = Gauge("minillm_requests_waiting", "Requests queued, not admitted yet", registry=r)
        self.requests = Counter("minillm_requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("minillm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("minillm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("minillm_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("minillm_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("minillm_request_duration_seconds", "From a request's arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("minillm_decode_batch_size", "Sequences in a decode step", buckets=BATCH_BUCKETS,
                               registry=r)
        self.kv_used = Gauge("minillm_kv_blocks_used", "KV pool blocks holding keys and values", registry=r)
        self.kv_total = Gauge("minillm_kv_blocks_total", "KV pool blocks", registry=r)
        self.prefix_queries = Counter("minillm_prefix_cache_queries", "Prompt blocks looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("minillm_prefix_cache_hits", "Prompt blocks found in the prefix cache", registry=r)

    def token(self, arrived: float, last: float | None, now: float):
        """One generated token of a request that arrived at `arrived`, whose previous token came at `last`."""
        self.generation_tokens.inc()
        if last is None:
            self.ttft.observe(now - arrived)
        else:
            self.itl.observe(now - last)

    def finished(self, finish_reason: str, arrived: float, now: float):
        self.requests.labels(finish_reason).inc()
        self.e2e.observe(now - arrived)

    def text(self) -> bytes:
        return generate_latest(self.registry)
