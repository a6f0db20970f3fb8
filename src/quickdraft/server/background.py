"""Run the server inside this process: uvicorn in a background thread on a loopback port (tests, load
tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from quickdraft.batching import BatchScheduler
from quickdraft.engine import Engine


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                                limit_concurrency=1024, backlog=512)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="quickdraft-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()


@dataclass
class RunningServer:
    """A scheduler and the HTTP server in front of it, both running in this process."""

    scheduler: BatchScheduler
    http: BackgroundServer
    model_name: str

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def base_url(self) -> str:
        return self.http.url + "/v1"

    def close(self) -> None:
        self.http.stop()
        self.scheduler.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(engine: Engine, drafter: str | None = None, drafter_options: dict[str, Any] | None = None,
                 model_name: str = "quickdraft", api_key: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, **scheduler_options: Any) -> RunningServer:
    """Start a scheduler for ``engine`` and serve it on ``host:port`` (0: a free port)."""
    from quickdraft.server.app import create_app

    scheduler = BatchScheduler(engine, drafter, drafter_options, **scheduler_options).start()
    try:
        app = create_app(scheduler, model_name, api_key=api_key)
        http = BackgroundServer(app, host, port).start()
    except BaseException:
        scheduler.close()
        raise
    return RunningServer(scheduler, http, model_name)
