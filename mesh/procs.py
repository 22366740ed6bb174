"""Starting aimesh components as real processes (used by `aimesh demo` and the tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Proc:
    """A child process that announced `listening on HOST:PORT` on stdout."""

    name: str
    popen: subprocess.Popen[str]
    address: str
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it has not exited within `timeout`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def kill(self) -> int:
        """SIGKILL: a crash, with no chance to drain."""
        if self.alive():
            self.popen.kill()
        return self.popen.wait()


def wait_for_output(proc: Proc, text: str, timeout: float = 10.0) -> str:
    """Waits until the process has printed a line containing `text`; returns that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.output):
            if text in line:
                return line
        if not proc.alive():
            break
        time.sleep(0.02)
    raise AssertionError(f"{proc.name} did not print {text!r}; output:\n" + "".join(proc.output))


def _drain(popen: subprocess.Popen[str], sink: list[str], seen: threading.Event) -> None:
    assert popen.stdout is not None
    for line in popen.stdout:
        sink.append(line)
        seen.set()
    seen.set()  # end of output: the process exited


def aimesh_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aimesh.mesh.cli", *args]


def start(
    name: str, argv: Sequence[str], *, timeout: float = 20.0, env: dict[str, str] | None = None
) -> Proc:
    """Starts `argv` and waits until it prints its listening address (or dies)."""
    popen = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,  # a Ctrl-C in the terminal reaches the parent only
    )
    # One thread reads every line as it comes (and keeps the pipe drained for the
    # process's whole life). Waiting on the pipe with a selector instead misses a line
    # that arrives in the same read as an earlier one: it sits in the reader's buffer,
    # and the selector never fires again.
    output: list[str] = []
    seen = threading.Event()
    threading.Thread(target=_drain, args=(popen, output, seen), daemon=True).start()
    deadline = time.monotonic() + timeout
    checked = 0
    while True:
        for line in output[checked:]:
            checked += 1
            m = _LISTENING.search(line)
            if m:
                return Proc(
                    name=name, popen=popen, address=f"{m.group(1)}:{m.group(2)}", output=output
                )
        if popen.poll() is not None and checked == len(output):
            popen.wait()
            raise RuntimeError(
                f"{name} exited with code {popen.returncode} before listening:\n" + "".join(output)
            )
        left = deadline - time.monotonic()
        if left <= 0:
            popen.kill()
            raise RuntimeError(f"{name} did not start within {timeout:g}s:\n" + "".join(output))
        seen.clear()
        if checked == len(output):
            seen.wait(min(left, 0.1))


def start_sim(
    name: str,
    models: Sequence[str],
    *extra: str,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    control_plane: str | None = None,
    service: str | None = None,
) -> Proc:
    """A sim backend serving `models`; with `control_plane`, it registers there (as
    `service`, by default its first model's)."""
    args = ["backend", "sim", "--listen", f"{host}:0", "--instance-id", name]
    for m in models:
        args += ["--model", m]
    if control_plane:
        args += ["--control-plane", control_plane]
    if service:
        args += ["--service", service]
    return start(name, aimesh_command(*args, *extra), timeout=timeout, env=env)


def start_control_plane(
    *extra: str,
    host: str = "127.0.0.1",
    store: str = "memory",
    admin: bool = True,
    name: str = "control-plane",
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """`aimesh control-plane` on a free port of `host` (`--listen HOST:PORT` in `extra`
    to choose one), with its admin port when `admin` (see `admin_url`)."""
    args = ["control-plane", "--store", store]
    if not any(a == "--listen" for a in extra):
        args += ["--listen", f"{host}:0"]
    if admin:
        args += ["--admin", f"{host}:0"]
    return start(name, aimesh_command(*args, *extra), timeout=timeout, env=env)


def admin_url(proc: Proc) -> str:
    """The base URL (http://HOST:PORT) of a control plane's or proxy's admin port, from the
    `admin on http://...` part of its startup line."""
    line = wait_for_output(proc, "admin on ")
    url = line.split("admin on ", 1)[1].split(";", 1)[0].strip()
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
