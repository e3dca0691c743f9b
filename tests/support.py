"""Helpers shared by the tests: free ports, a router subprocess, fake OpenCode subprocesses."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"opencode server listening on http://(\S+):(\d+)")


@contextmanager
def checkout_reachable_by_other_users() -> Iterator[None]:
    """Let processes of another uid traverse to this checkout while the block runs.

    Tests that start a server as ``nobody`` need to read this checkout and its virtualenv; a
    clone in a ``mktemp -d`` folder (mode 0700) would hide them. Only search permission (o+x) is
    added, to the folders on the way that lack it, and the old modes are put back afterwards.
    """
    changed: list[tuple[Path, int]] = []
    for folder in [REPO, *REPO.parents]:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & stat.S_IXOTH and os.getuid() == 0:
            folder.chmod(mode | stat.S_IXOTH)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child that must import this checkout's code and plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, claimed for this run (see ``free_port_block``)."""
    return free_port_block(1, host=host)


@contextmanager
def dashboard_stub(*args: str) -> Iterator[str]:
    """``tests/dashboard_stub.py`` as a child process (``args`` after its port); yields its URL, stops it after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.dashboard_stub", str(port), *args], cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def ephemeral_port_start(default: int = 32768) -> int:
    """The first port the kernel hands out to outgoing connections (Linux's ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


#: A folder shared by every process of one test run (set by conftest): a port handed out is claimed
#: there, so no other worker is handed it too while the first has not bound it yet.
PORT_CLAIMS = "OPENCODEROUTER_TEST_PORT_CLAIMS"
_claimed_here: set[int] = set()


def free_port_block(size: int, start: int = 20000, end: int | None = None, host: str = "127.0.0.1") -> int:
    """The first port of ``size`` consecutive ports that are free right now and handed out to nobody else.

    The block lies below the ephemeral ports, so nothing that binds port 0 (a server of another worker,
    a client's outgoing connection) takes one of them between this check and the listen. Each port is
    handed out once per run: claimed in a folder every worker shares. Each process starts looking at
    its own offset (parallel workers rarely meet) and wraps around once.
    """
    end = end if end is not None else ephemeral_port_start()
    blocks = (end - start) // size
    if blocks < 1:
        raise ValueError(f"no room for {size} ports between {start} and {end}")
    first = os.getpid() * 37 % blocks
    for index in [*range(first, blocks), *range(first)]:
        port = start + index * size
        block = range(port, port + size)
        if all(_port_free(p, host) for p in block) and all(_claim(p) for p in block):
            return port
    raise RuntimeError(f"no free block of {size} ports between {start} and {end}")


def _claim(port: int) -> bool:
    """True once ``port`` is ours for this run; False if this or another process was handed it before."""
    if port in _claimed_here:
        return False
    folder = os.environ.get(PORT_CLAIMS)
    if folder:
        try:
            os.close(os.open(os.path.join(folder, str(port)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    _claimed_here.add(port)
    return True


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """GET with urllib; returns (status, headers, body) for any status."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def http_json(url: str, **kwargs: Any) -> Any:
    """GET and decode JSON (any status)."""
    return json.loads(http_get(url, **kwargs)[2])


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # keep polling; report the last error on timeout
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


class FakeOpenCodeProcess:
    """``python -m opencoderouter.testing serve`` in a directory, as a child process."""

    def __init__(self, directory: str | Path, port: int = 0, heartbeat: float = 10.0, env: dict[str, str] | None = None,
                 module: str = "opencoderouter.testing", as_user: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.directory = str(directory)
        Path(directory).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", module, "serve", "--port", str(port), "--directory", self.directory,
                   "--heartbeat", str(heartbeat), *extra]
        if as_user is not None:
            # Another uid's server (as root): the socket table then records that owner.
            command = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups", *command]
        self.process = subprocess.Popen(
            command, cwd="/" if as_user else self.directory,
            env=subprocess_env(**({"HOME": "/tmp"} if as_user else {}), **(env or {})),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            self.port = self._wait_listening()
        except BaseException:
            self.stop()  # never leave a half-started child behind
            raise

    def _wait_listening(self) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"fake opencode exited with {self.process.wait()}")
            match = LISTENING.search(line)
            if match:
                return int(match.group(2))
        raise RuntimeError("fake opencode did not start")

    def stop(self) -> None:
        """Terminate and reap."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


class RouterProcess:
    """``twistd -n opencoderouter ...`` as a child process, ready when /api/health answers."""

    def __init__(self, *args: str, port: int | None = None, env: dict[str, str] | None = None,
                 wait: bool = True, cwd: str | None = None) -> None:
        self.port = port or free_port()
        self.args = ["--port", str(self.port), "--hostname", "127.0.0.1", "--mdns=false", *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ocr-router-{os.getpid()}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "opencoderouter", *self.args],
            env=subprocess_env(**(env or {})), stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            try:
                self.wait_healthy()
            except BaseException:
                self.stop()  # never leave a half-started router behind
                raise

    def wait_healthy(self, timeout: float = 15) -> None:
        """Block until our router's /api/health answers; fail at once if it exited or another server answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log()}")
            try:
                status, _, body = http_get(self.url + "/api/health", timeout=1)
            except (OSError, http.client.HTTPException):
                status, body = None, b""
            if status == 200:
                try:  # another server may answer on this port (OpenCode's own /api/health says healthy too)
                    health = json.loads(body)
                    if health.get("healthy") is True and {"username", "backends"} <= health.keys():
                        return
                except (ValueError, AttributeError):
                    pass
                raise RuntimeError(f"something else answers on port {self.port}: {body[:200]!r}\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for router health:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """Everything the router wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal, wait and reap; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
