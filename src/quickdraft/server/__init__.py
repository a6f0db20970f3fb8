"""``quickdraft serve``: an OpenAI-compatible HTTP server with batched speculative decoding.

- :mod:`quickdraft.server.app`: the FastAPI app (routes, auth, streaming, cancellation),
- :mod:`quickdraft.server.protocol`: OpenAI request validation and response bodies,
- :mod:`quickdraft.server.metrics`: Prometheus metrics,
- :mod:`quickdraft.server.background`: running the server in-process (tests, load tests),
- :mod:`quickdraft.server.cli`: the ``serve`` command,
- :mod:`quickdraft.server.loadtest`: a load generator reporting latency percentiles and tokens/s.

The decoding itself is :class:`quickdraft.batching.BatchScheduler`.
"""

from quickdraft.server.background import RunningServer, start_server

__all__ = ["RunningServer", "start_server"]
