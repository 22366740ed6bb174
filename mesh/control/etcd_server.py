"""A throwaway single-member etcd on 127.0.0.1, for the tests and `make etcd`.

`EtcdServer().start(data_dir)` launches the etcd binary (Debian's `etcd-server` package;
`scripts/install-etcd.sh` installs it), waits until its /health endpoint answers, and
`stop()` ends it. Starting it again on the same data dir and ports is an etcd restart: the
data and revisions survive, the leases get their full ttl again.

    python -m aimesh.mesh.control.etcd_server --data-dir .etcd-data --port 2379

runs one in the foreground until Ctrl-C (what `make etcd` does).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"

INSTALL_HINT = (
    "etcd is not installed: run scripts/install-etcd.sh (Debian/Ubuntu: "
    "`apt-get install etcd-server`), or put an etcd 3.4+ binary on PATH"
)

# etcd 3.4 refuses to run on architectures it does not officially support unless told to.
_SUPPORTED_ARCH = {"x86_64", "amd64", "ppc64le"}
_GOARCH = {"aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "s390x": "s390x"}


def find_etcd() -> str:
    """The etcd binary's path; RuntimeError with the install hint when there is none."""
    found = shutil.which("etcd")
    if found:
        return found
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    raise RuntimeError(INSTALL_HINT)


def free_port() -> int:
    """A port nothing listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise RuntimeError(
                f"cannot start etcd: {what} port {HOST}:{port} is in use ({exc.strerror}). "
                "Is another etcd running there (Debian's package starts a system service on "
                "2379: `systemctl status etcd`)? Use it, stop it, or pick another port."
            ) from None


class EtcdServer:
    """One etcd process. `echo=True` copies its log to stderr (else only kept for errors)."""

    def __init__(self, name: str = "aimesh", *, echo: bool = False) -> None:
        self.name = name
        self.echo = echo
        self.data_dir: Path | None = None
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)

    @property
    def endpoint(self) -> str:
        """HOST:PORT for clients (EtcdStore's `endpoints`)."""
        if not self.client_port:
            raise RuntimeError("etcd is not started")
        return f"{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def output(self) -> str:
        """The last lines etcd logged."""
        return "".join(self._output)

    def command(self, binary: str) -> list[str]:
        assert self.data_dir is not None
        client = f"http://{HOST}:{self.client_port}"
        peer = f"http://{HOST}:{self.peer_port}"
        return [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-token", f"aimesh-{self.name}",
            # A single member elects itself at once; the short election timeout also
            # lowers etcd's minimum lease ttl (1.5 x election timeout) to 1 s, the mesh's
            # MIN_TTL, instead of 2 s with the defaults.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def start(
        self, data_dir: Path, client_port: int = 0, peer_port: int = 0, timeout: float = 20.0
    ) -> None:
        """Starts etcd and returns once it serves clients; RuntimeError (with etcd's log)
        if it does not within `timeout`. Ports 0 mean free ones."""
        if self.running:
            raise RuntimeError(f"etcd is already running on {self.endpoint}")
        binary = find_etcd()
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        _check_port_free(self.client_port, "client")
        _check_port_free(self.peer_port, "peer")
        # Our flags, not whatever ETCD_* the environment holds (etcd rejects a setting given
        # both ways).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        machine = platform.machine().lower()
        if machine not in _SUPPORTED_ARCH:
            env["ETCD_UNSUPPORTED_ARCH"] = _GOARCH.get(machine, machine)
        self._output.clear()
        self._proc = subprocess.Popen(
            self.command(binary),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the parent only
        )
        threading.Thread(target=self._drain, args=(self._proc,), daemon=True).start()
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._output.append(line)
            if self.echo:
                sys.stderr.write(line)

    def _wait_healthy(self, timeout: float) -> None:
        url = f"http://{HOST}:{self.client_port}/health"
        # No proxies: an http_proxy in the environment must not see 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with code {self._proc.returncode} while starting:\n" + self.output
                )
            try:
                with opener.open(url, timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") in ("true", True):
                        return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd did not become healthy on {url} within {timeout:g}s:\n" + self.output
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; waits for the exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    def wait(self) -> int:
        """Blocks until etcd exits; its exit code."""
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aimesh.mesh.control.etcd_server",
        description="Run a local single-member etcd in the foreground (Ctrl-C stops it).",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(".etcd-data"))
    parser.add_argument("--port", type=int, default=2379, help="client port (0: a free one)")
    parser.add_argument(
        "--peer-port", type=int, default=None, help="peer port (default: client port + 1)"
    )
    parser.add_argument("--name", default="aimesh")
    parser.add_argument("-v", "--verbose", action="store_true", help="show etcd's own log")
    args = parser.parse_args(argv)
    peer_port = (
        args.peer_port if args.peer_port is not None else (args.port + 1 if args.port else 0)
    )

    server = EtcdServer(args.name, echo=args.verbose)
    try:
        server.start(args.data_dir, args.port, peer_port)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C stops it even when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(
        f"etcd listening on {server.endpoint} (data in {server.data_dir}); "
        f"--store etcd://{server.endpoint}; Ctrl-C stops it",
        flush=True,
    )
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.stop()
        print("etcd stopped", flush=True)
        return 0
    print(f"etcd exited with code {code}:\n{server.output}", file=sys.stderr)
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
