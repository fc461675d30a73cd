"""`microswarm call` on a terminal: the call is submitted, its progress (the service's
`self.progress()`) drawn as a bar with its message on stderr, and its envelope fetched when it
ends; the CLI prints it exactly as for a direct call. Ctrl-C cancels it (the Cancel RPC)."""
from __future__ import annotations

import threading
from typing import Any

POLL_S = 0.25  # one Result request waits at most this long: the bar moves at least this often


class CallBar:
    def __init__(self, console: Any) -> None:
        self.console = console
        self.call_id = ""
        self._client: Any = None
        self.stopped = threading.Event()

    def run(self, client: Any, service: str, data: bytes, timeout: float | None, encoding: int) -> Any:
        """Submit the call, draw its progress until it ends, and return its envelope."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from microcores.handles import envelope_of

        self._client = client
        handle = client.submit(service, data, timeout=timeout, encoding=encoding)
        self.call_id = handle.id
        columns = (TextColumn("[bold]{task.fields[service]}[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), TextColumn("{task.fields[message]}", markup=False))
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(service, total=1.0, service=service, message="")
            while not self.stopped.is_set():
                r = client._result_reply(self.call_id, POLL_S)
                env = envelope_of(r)
                if env is not None:
                    return env
                bar.update(task, completed=float(r.progress), message=r.progress_message)
        raise KeyboardInterrupt  # cancelled from the main thread (cancel())

    def cancel(self) -> None:
        """Ctrl-C: stop the submitted call (its job stops wherever it runs)."""
        self.stopped.set()
        if self._client is not None and self.call_id:
            try:
                self._client.cancel(self.call_id)
            except Exception:  # noqa: BLE001 - exiting anyway; the coordinator's deadline ends it otherwise
                pass
