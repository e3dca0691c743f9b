"""Several network namespaces on one bridge: a LAN of machines (routers, a client, a DNS server) on this box.

The bridge itself sits in a namespace of its own (the "switch"), so nothing the members send reaches
the machine's real interfaces. Recipe: /work/shared/mdns-testing.md, with a bridge instead of one veth pair.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .netns import StartedProcesses, _run, netns_unavailable
from .support import subprocess_env, wait_for

__all__ = ["Bridge", "netns_unavailable", "remove_stale_bridges"]

PREFIX = "ocrlan"


def remove_stale_bridges() -> None:
    """Delete namespaces left by an earlier run that was killed (its pid is gone), and their processes."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != PREFIX or not parts[1].isdigit() or os.path.exists(f"/proc/{parts[1]}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Bridge(StartedProcesses):
    """Member namespaces (``members``: role → namespace) on 10.X.Y.0/24, joined by a bridge in a switch namespace."""

    def __init__(self, roles: Sequence[str]) -> None:
        remove_stale_bridges()
        self.tag = secrets.token_hex(3)
        self.switch = f"{PREFIX}-{os.getpid()}-{self.tag}-sw"
        self.members = {role: f"{PREFIX}-{os.getpid()}-{self.tag}-{role}" for role in roles}
        subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.address = {role: f"{subnet}.{n + 1}" for n, role in enumerate(roles)}
        self.interface = {role: f"ol{self.tag}{n}" for n, role in enumerate(roles)}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ocr-lan-{self.tag}-"))
        os.chmod(self.tmp, 0o755)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        try:
            self._create(roles)
        except BaseException:
            self.close()
            raise

    def _create(self, roles: Sequence[str]) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        # Without snooping the bridge floods multicast to every port, as a plain switch does.
        _run("ip", "-n", self.switch, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for n, role in enumerate(roles):
            ns, inside, outside = self.members[role], self.interface[role], f"ob{self.tag}{n}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "link", "set", outside, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", outside, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", outside, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address[role]}/24", "dev", inside)
            _run("ip", "-n", ns, "link", "set", inside, "up", "multicast", "on")
            _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", inside)

    # -- processes ----------------------------------------------------------------------------------------
    def spawn(self, role: str, command: Sequence[str], name: str, env: dict[str, str] | None = None,
              stdout: Any = None, cwd: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` on machine ``role``; its output goes to ``{name}.log`` unless ``stdout``."""
        log = open(self.tmp / f"{name}.log", "ab")
        self._logs.append(log)
        process = subprocess.Popen(["ip", "netns", "exec", self.members[role], *command],
                                   stdout=stdout if stdout is not None else log, stderr=log, env=env, cwd=cwd,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self._processes.append(process)
        return process

    def run(self, role: str, command: Sequence[str], timeout: float = 30, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on machine ``role`` to completion."""
        return subprocess.run(["ip", "netns", "exec", self.members[role], *command], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)


    def start_avahi(self, role: str) -> dict[str, str]:
        """A private system bus and an avahi-daemon on machine ``role``; returns the environment for its clients."""
        from .netns import _AVAHI_CONFIG, _BUS_CONFIG

        socket = self.tmp / f"bus-{role}.socket"
        (self.tmp / f"bus-{role}.conf").write_text(_BUS_CONFIG.format(socket=socket))
        self.spawn(role, ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={self.tmp / f'bus-{role}.conf'}"],
                   f"dbus-{role}")
        wait_for(socket.exists, 10, what="the private D-Bus socket")
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={socket}")
        config = self.tmp / f"avahi-{role}.conf"
        config.write_text(_AVAHI_CONFIG.format(host=f"{role}{self.tag}", interface=self.interface[role]))
        self.spawn(role, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs ocr-run /run && exec avahi-daemon --no-drop-root --no-chroot --no-rlimits '
                          '--no-proc-title -f "$1"', "avahi", str(config)], f"avahi-{role}", env=env)
        wait_for(lambda: "Server startup complete" in self.log(f"avahi-{role}"), 15, what="avahi-daemon start-up")
        return env

    def log(self, name: str) -> str:
        """What process ``name`` wrote so far."""
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


    def close(self) -> None:
        """Stop every process, delete every namespace (the veths go with them) and the temp folder."""
        for process in reversed(self._processes):
            try:
                self.stop(process, timeout=10)
            except OSError as error:
                print(f"could not stop {process.args}: {error}")
        for log in self._logs:
            log.close()
        for ns in [*self.members.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- HTTP from inside a machine ------------------------------------------------------------------------
    def http(self, role: str, url: str, host: str = "") -> dict[str, Any]:
        """GET ``url`` from machine ``role``: ``{status, body}``."""
        from .netns import _HTTP_SCRIPT

        result = self.run(role, [sys.executable, "-c", _HTTP_SCRIPT, url, host], timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"HTTP GET {url} on {role} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def json(self, role: str, url: str) -> Any:
        """GET ``url`` from machine ``role`` and decode the JSON body (any status)."""
        return json.loads(self.http(role, url)["body"])

    # -- routers and backends ------------------------------------------------------------------------------
    def start_router(self, role: str, *args: str, name: str | None = None, port: int = 8080,
                     ) -> subprocess.Popen[bytes]:
        """``twistd -n opencoderouter`` on machine ``role`` (listening on every address), ready once it answers."""
        name = name or f"router-{role}"
        process = self.spawn(role, [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                    "--pidfile=", "opencoderouter", "--port", str(port), *args], name,
                             env=subprocess_env())

        def healthy() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"router on {role} exited with {process.returncode}:\n{self.log(name)}")
            try:
                return self.http(role, f"http://127.0.0.1:{port}/api/health")["status"] == 200
            except RuntimeError:
                return False

        try:
            wait_for(healthy, 30, interval=0.2, what=f"the router's health on {role}")
        except BaseException:
            self.stop(process)
            raise
        return process

    def start_backend(self, role: str, directory: Path, port: int, version: str | None = None,
                      ) -> subprocess.Popen[bytes]:
        """A fake OpenCode server on machine ``role``'s 127.0.0.1:``port``."""
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "opencoderouter.testing", "serve", "--port", str(port),
                   "--directory", str(directory)]
        if version:
            command += ["--version-string", version]
        name = f"backend-{role}-{port}"
        process = self.spawn(role, command, name, env=subprocess_env(PYTHONDONTWRITEBYTECODE="1"))

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"fake backend exited with {process.returncode}:\n{self.log(name)}")
            return "listening on" in self.log(name)

        wait_for(listening, 15, interval=0.1, what=f"the fake backend on {role}:{port}")
        return process
