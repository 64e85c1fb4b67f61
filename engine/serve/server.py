"""Running the application under uvicorn, with a graceful end on SIGTERM and SIGINT."""

from __future__ import annotations

import contextlib

import uvicorn

__all__ = ["run_server"]


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT it shut down for gracefully ends the
    process with status 0: uvicorn (0.29 and later) raises the signal again after its shutdown,
    and the process would then die of it (-15) with its work done."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def run_server(app, *, host: str, port: int) -> None:
    """Serves ``app`` until SIGTERM or SIGINT: then no new connections, the requests in flight
    finish, the application's shutdown runs (not ready; the batcher finishes its queue), and
    this returns."""
    _GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
