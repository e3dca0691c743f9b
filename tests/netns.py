"""Two network namespaces joined by a veth pair (a router's machine and a laptop), a private D-Bus
system bus and an avahi-daemon for the laptop: the LAN of the mDNS tests, invisible to the real network."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .support import wait_for

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

_AVAHI_CONFIG = """[server]
host-name={host}
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-addresses=yes
publish-hinfo=no
publish-workstation=no
[reflector]
[rlimits]
"""


def netns_unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "avahi-daemon", "avahi-browse", "avahi-resolve", "dbus-daemon", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tests/setup/install-system-deps.sh installs it)"
    probe = f"ocrprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def remove_stale_namespaces() -> None:
    """Delete namespaces left by an earlier run of these tests that was killed (its pid is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != "ocrmdns" or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue  # that run is still going
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)  # processes those tests started inside their namespace
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)



def stop_session(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Signal ``process``'s session, wait and reap; SIGKILL after ``timeout``; returns the exit status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode

class StartedProcesses:
    """The processes a namespace fixture started (in ``_processes``), stopped one by one or since a mark."""

    _processes: list[subprocess.Popen[bytes]]

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal ``process``'s session, wait and reap; SIGKILL after ``timeout``; returns the exit status."""
        return stop_session(process, sig, timeout)

    def checkpoint(self) -> int:
        """A mark for ``stop_since``."""
        return len(self._processes)

    def stop_since(self, mark: int) -> None:
        """Stop every process started after ``checkpoint()`` returned ``mark`` (newest first)."""
        for process in reversed(self._processes[mark:]):
            self.stop(process, timeout=10)
        del self._processes[mark:]


class Lan(StartedProcesses):
    """Namespaces ``a`` (router) and ``b`` (laptop) on 10.X.Y.1/24 and .2; everything removed by ``close``."""

    def __init__(self) -> None:
        remove_stale_namespaces()
        tag = secrets.token_hex(3)
        # ocrmdns-PID-TAG-x: the creating pid lets a later run clean up after a killed one.
        self.a, self.b = f"ocrmdns-{os.getpid()}-{tag}-a", f"ocrmdns-{os.getpid()}-{tag}-b"
        self.veth_a, self.veth_b = f"ocrm{tag}x", f"ocrm{tag}y"  # interface names: 15 characters at most
        subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.address_a, self.address_b = f"{subnet}.1", f"{subnet}.2"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ocr-mdns-{tag}-"))
        os.chmod(self.tmp, 0o755)  # the backend run as nobody reads its project folder in here
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self.bus_address = ""
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _run("ip", "netns", "add", self.a)
        _run("ip", "netns", "add", self.b)
        _run("ip", "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        for ns, veth, address in ((self.a, self.veth_a, self.address_a), (self.b, self.veth_b, self.address_b)):
            _run("ip", "link", "set", veth, "netns", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _run("ip", "-n", ns, "link", "set", veth, "up", "multicast", "on")
            _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)

    # -- processes ----------------------------------------------------------------------------------
    def spawn(self, ns: str, command: Sequence[str], name: str, env: dict[str, str] | None = None,
              stdout: Any = None) -> subprocess.Popen[bytes]:
        """Start ``command`` inside namespace ``ns``; its output goes to a log file unless ``stdout``."""
        log = open(self.tmp / f"{name}.log", "wb")
        self._logs.append(log)
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *command],
            stdout=stdout if stdout is not None else log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def run(self, ns: str, command: Sequence[str], timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside ``ns`` to completion."""
        return subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)


    def log(self, name: str) -> str:
        """What process ``name`` wrote so far."""
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_avahi(self) -> None:
        """A private system bus and an avahi-daemon in namespace ``b`` (the laptop's)."""
        socket = self.tmp / "system_bus_socket"
        (self.tmp / "bus.conf").write_text(_BUS_CONFIG.format(socket=socket))
        self.spawn(self.b, ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={self.tmp / 'bus.conf'}"],
                   "dbus")
        wait_for(socket.exists, 10, what="the private D-Bus socket")
        self.bus_address = f"unix:path={socket}"
        (self.tmp / "avahi.conf").write_text(_AVAHI_CONFIG.format(host=f"{self.veth_b}-laptop", interface=self.veth_b))
        # A private /run (own mount namespace) keeps avahi's pid file and socket away from any other avahi.
        self.spawn(
            self.b,
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs ocr-run /run && exec avahi-daemon --no-drop-root --no-chroot --no-rlimits '
             '--no-proc-title -f "$1"', "avahi", str(self.tmp / "avahi.conf")],
            "avahi",
            env=self.bus_env(),
        )
        wait_for(lambda: "Server startup complete" in self.log("avahi"), 15, what="avahi-daemon start-up")

    def bus_env(self) -> dict[str, str]:
        """The environment that points Avahi's clients at the private bus."""
        env = dict(os.environ)
        if self.bus_address:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus_address
        return env


    def close(self) -> None:
        """Stop every process started here, delete both namespaces (and the veth pair) and the temp folder."""
        for process in reversed(self._processes):
            try:
                self.stop(process, timeout=10)
            except OSError as error:  # keep cleaning up the rest; say what could not be stopped
                print(f"could not stop {process.args}: {error}")
        for log in self._logs:
            log.close()
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


class Browser:
    """A long-running ``avahi-browse -rpk _opencode._tcp`` in the laptop namespace, its lines collected."""

    def __init__(self, lan: Lan) -> None:
        self.lan = lan
        self.path = lan.tmp / "browse.out"
        self._out = open(self.path, "wb")
        self.process = lan.spawn(lan.b, ["avahi-browse", "-rpk", "_opencode._tcp"], "browse",
                                 env=lan.bus_env(), stdout=self._out)

    def close(self) -> None:
        """Stop avahi-browse and close its output file."""
        self.lan.stop(self.process)
        self._out.close()

    def lines(self) -> list[list[str]]:
        """Every complete line so far, split on ``;`` (avahi-browse may be half-way through writing the last)."""
        text = self.path.read_text(errors="replace")
        text = text[: text.rfind("\n") + 1]
        return [line.split(";") for line in text.splitlines() if line]

    def resolved(self, name: str) -> list[str] | None:
        """The latest ``=`` line for instance ``name``, if any."""
        found = [f for f in self.lines() if f[0] == "=" and f[3] == name and f[2] == "IPv4"]
        return found[-1] if found else None

    def removed(self, name: str) -> bool:
        """True once a ``-`` (goodbye) line for ``name`` appeared."""
        return any(f[0] == "-" and f[3] == name for f in self.lines())


def parse_txt(field: str) -> dict[str, str]:
    """``"a=1" "b=2"`` (avahi-browse -p's TXT field) as a dict."""
    result = {}
    for item in field.split('" "'):
        key, _, value = item.strip('"').partition("=")
        result[key] = value
    return result


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """``wait_for`` with a coarser poll (these checks spawn processes)."""
    return wait_for(predicate, timeout, interval=0.2, what=what)


def monotonic() -> float:
    """Seconds on the monotonic clock."""
    return time.monotonic()


ROUTER_PORT = 8080


def start_router(lan: Lan, *args: str, name: str = "router", api_host: str = "127.0.0.1",
                 prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """``twistd -n opencoderouter --mdns=true`` in namespace ``a``; ready once its API answers there."""
    import sys

    from .support import subprocess_env

    process = lan.spawn(
        lan.a,
        [*prefix, sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "opencoderouter", "--port", str(ROUTER_PORT), "--mdns=true", *args],
        name,
        env=subprocess_env(),
    )

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"router exited with {process.returncode}:\n{lan.log(name)}")
        return http_in(lan, lan.a, f"http://{api_host}:{ROUTER_PORT}/api/health")["status"] == 200

    try:
        wait_until(healthy, 20, "the router's health in namespace a")
    except BaseException:
        lan.stop(process)
        raise
    return process


_HTTP_SCRIPT = """
import json, sys, urllib.request, urllib.error
url, host = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"Host": host} if host else {})
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
print(json.dumps({"status": status, "body": body.decode("utf-8", "replace")}))
"""


def http_in(lan: Lan, ns: str, url: str, host: str = "") -> dict[str, Any]:
    """GET ``url`` from inside namespace ``ns`` (optionally with a Host header): ``{status, body}``."""
    import json
    import sys

    result = lan.run(ns, [sys.executable, "-c", _HTTP_SCRIPT, url, host], timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"HTTP GET {url} in {ns} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def start_backend(lan: Lan, directory: Path, port: int, user: str | None = None, version: str | None = None,
                  name: str | None = None) -> subprocess.Popen[bytes]:
    """A fake OpenCode server in namespace ``a`` on 127.0.0.1:``port`` (as ``user`` via setpriv)."""
    import sys

    from .support import subprocess_env

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    command = [sys.executable, "-m", "opencoderouter.testing", "serve", "--port", str(port),
               "--directory", str(directory)]
    if version:
        command += ["--version-string", version]
    if user:
        command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
    log_name = name or f"backend-{port}-{secrets.token_hex(2)}"
    env = subprocess_env(PYTHONDONTWRITEBYTECODE="1")
    process = lan.spawn(lan.a, command, log_name, env=env, stdout=None)

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"fake backend exited with {process.returncode}:\n{lan.log(log_name)}")
        return "listening on" in lan.log(log_name)

    wait_until(listening, 15, f"the fake backend on port {port}")
    return process


_ZEROCONF_INFO = """
import json, sys
from zeroconf import Zeroconf
zc = Zeroconf(interfaces=[sys.argv[2]])
try:
    info = zc.get_service_info("_opencode._tcp.local.", sys.argv[1] + "._opencode._tcp.local.", timeout=5000)
    print(json.dumps(None if info is None else {
        "name": info.name, "server": info.server, "port": info.port, "addresses": info.parsed_addresses(),
        "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()}}))
finally:
    zc.close()
"""


def zeroconf_info(lan: Lan, instance: str) -> dict[str, Any] | None:
    """python-zeroconf's ``get_service_info`` for ``instance``, asked from the laptop namespace."""
    import json
    import sys

    result = lan.run(lan.b, [sys.executable, "-c", _ZEROCONF_INFO, instance, lan.address_b], timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"zeroconf lookup failed: {result.stderr.strip()}")
    return json.loads(result.stdout)
