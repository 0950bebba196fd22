"""The temporary Prefect API of a CLI run without ``PREFECT_API_URL``: started by the CLI, stopped by it.

Prefect would start one itself (its "ephemeral" server), with a 20 s start-up limit that two of three
first launches on a loaded machine missed, and stop it only at a normal interpreter exit: every run
killed by SIGTERM left one behind (about 200 MB), and a Ctrl-C in a terminal reached it too (same
process group), so the run could not even record that it stopped. Here the server:

- gets ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (default ``DEFAULT_STARTUP_TIMEOUT`` s) to
  answer, and when it does not, a ``LocalAPIError`` says in a few lines what to set;
- runs in its own session (a terminal's Ctrl-C reaches only the CLI, which stops cleanly and then
  stops the server), and on Linux dies with the CLI even when the CLI is SIGKILLed (``PR_SET_PDEATHSIG``);
- is stopped on every way out of ``local_api``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from indusfactory.infra.errors import IndusfactoryError

TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = 180
"""Seconds the temporary API gets to answer unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is set
(Prefect's own default, 20 s, is missed on a loaded machine)."""


class LocalAPIError(IndusfactoryError):
    """The temporary Prefect API did not start: the message says what to set."""


def startup_timeout() -> int:
    """``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` from the environment, else ``DEFAULT_STARTUP_TIMEOUT``."""
    value = os.environ.get(TIMEOUT_SETTING, "").strip()
    try:
        return max(1, int(float(value))) if value else DEFAULT_STARTUP_TIMEOUT
    except ValueError:
        raise LocalAPIError(f"{TIMEOUT_SETTING}={value!r} is not a number of seconds") from None


def configured_api_url() -> str | None:
    """The Prefect API this process would use (environment or Prefect profile), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """In the server process: get SIGTERM when the CLI that started it dies, however it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def server_command(port: int) -> list[str]:
    """Prefect's ephemeral server command (``SubprocessASGIServer``): the API alone, on loopback."""
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _server_class() -> Any:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class LocalAPIServer(SubprocessASGIServer):
        """Prefect's ephemeral server, started in its own session and bound to the CLI's life."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            env.pop("PREFECT_API_URL", None)
            return subprocess.Popen(
                server_command(self.port),
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the CLI only; the CLI stops it
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    return LocalAPIServer


def _failure_message(timeout: int, detail: str) -> str:
    return (
        f"the temporary Prefect API (started because PREFECT_API_URL is not set) did not start within "
        f"{timeout} s{': ' + detail if detail else ''}.\n"
        f"  On a loaded machine give it longer: {TIMEOUT_SETTING}=600 indusfactory run ...\n"
        "  Or run one Prefect server for every run: `prefect server start` (in another terminal), then\n"
        "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued to the API before it stops (as Prefect's test harness does)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    try:
        run_coro_as_sync(drain())
    except Exception:  # noqa: BLE001 - undelivered logs of a finished run must not fail it
        pass


@contextmanager
def local_api() -> Iterator[str | None]:
    """A Prefect API for the flows run inside: the configured one (yields None), else a temporary server
    (yields its URL) that is stopped on the way out, whatever the way out."""
    if configured_api_url():
        yield None
        return
    import prefect.context
    import prefect.settings

    timeout = startup_timeout()
    server_class = _server_class()
    server = server_class(port=_free_port())
    previous_default = server_class._instances.get(None)
    with ExitStack() as stack:
        stack.callback(_forget, server_class, previous_default)
        stack.callback(server.stop)
        _RUNNING.append(server)
        stack.callback(_RUNNING.remove, server)
        try:
            server.start(timeout=timeout)
        except Exception as exc:
            process = server.server_process
            code = process.poll() if process is not None else None
            detail = f"the server exited with code {code}" if code is not None else "it never answered"
            raise LocalAPIError(_failure_message(timeout, detail)) from exc
        server_class._instances[None] = server  # Prefect code asking for its ephemeral server gets this one
        stack.enter_context(
            prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: server.api_url})
        )
        global_context = getattr(prefect.context, "_temporary_global_settings_context", None)
        if global_context is not None:
            stack.enter_context(global_context(prefect.context.get_settings_context()))
        stack.callback(_drain_prefect_workers)
        yield server.api_url


_RUNNING: list[Any] = []


def kill_now() -> None:
    """Kill the temporary API at once (the CLI's second Ctrl-C, just before it exits without cleaning up)."""
    for server in list(_RUNNING):
        process = server.server_process
        if process is not None and process.poll() is None:
            process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _forget(server_class: type, previous_default: Any) -> None:
    if previous_default is not None:
        server_class._instances[None] = previous_default  # type: ignore[attr-defined]
    else:
        server_class._instances.pop(None, None)  # type: ignore[attr-defined]
