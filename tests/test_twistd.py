"""The twistd plugin: discovery, makeService, start-up failures, daemon mode, packaging."""

from __future__ import annotations

import os
import signal
import site
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import getPlugins

from opencoderouter.tap import Options, makeService

from .support import REPO, free_port, http_get, http_json, subprocess_env, wait_for

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_the_dropin_is_discovered():
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "opencoderouter" in makers
    assert makers["opencoderouter"].module == "opencoderouter.tap"


def test_the_dropin_imports_nothing_heavy():
    code = (
        "import sys; import runpy; runpy.run_path('twisted/plugins/opencoderouter_plugin.py');"
        "heavy = [m for m in ('opencoderouter.tap', 'klein', 'treq', 'zeroconf', 'twisted.web.server') if m in sys.modules];"
        "print(heavy)"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, check=True).stdout
    assert output.strip() == "[]"


def test_make_service_is_a_multiservice_of_the_parts():
    options = Options()
    options.parseOptions(["--port", "0", "--mdns=false"])
    service = makeService(options)
    assert isinstance(service, MultiService)
    assert service.getServiceNamed("scanner") and service.getServiceNamed("web")


def test_router_subprocess_answers_health(router_factory):
    router = router_factory("--scan-start", "1", "--scan-end", "1")
    assert http_json(router.url + "/api/health")["healthy"] is True
    assert f"OpenCodeRouter listening on 127.0.0.1:{router.port}" in router.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_router_cleanly(router_factory, sig):
    router = router_factory("--scan-start", "1", "--scan-end", "1")
    # Twisted re-raises the signal after a clean shutdown, so the exit status names it.
    assert router.stop(sig) == -sig
    assert "Main loop terminated." in router.log() and "Server Shut Down." in router.log()
    assert "Traceback" not in router.log()


def test_a_port_in_use_aborts_startup_with_a_clear_message():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "opencoderouter", "--port", str(port), "--hostname", "127.0.0.1",
             "--mdns=false"],
            env=subprocess_env(), capture_output=True, text=True, timeout=30,
        )
    assert result.returncode != 0
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use" in result.stderr + result.stdout


def test_bad_flags_exit_non_zero_with_one_line_before_listening():
    port = free_port()
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "opencoderouter", "--port", str(port), "--scan-interval", "soon"],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["opencoderouter: --scan-interval: 'soon' is not a duration "
                                                  "(use e.g. 800ms, 5s, 1m30s or plain seconds)"]


def test_daemon_writes_the_pidfile_and_kill_removes_it(tmp_path):
    port = free_port()
    pidfile, logfile = tmp_path / "ocr.pid", tmp_path / "ocr.log"
    result = subprocess.run(
        [*TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "opencoderouter", "--port", str(port),
         "--hostname", "127.0.0.1", "--mdns=false", "--scan-start", "1", "--scan-end", "1"],
        env=subprocess_env(), capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile"))
    try:
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/api/health", timeout=1)[0] == 200)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="daemon exit")
        assert not pidfile.exists()
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_pip_install_puts_the_dropin_where_twistd_finds_it(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies come from the test environment; the package itself is installed for real.
    Path(purelib, "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(REPO)], check=True, env=env, cwd=tmp_path, timeout=300)
    assert Path(purelib, "twisted/plugins/opencoderouter_plugin.py").exists()
    assert not Path(purelib, "twisted/__init__.py").exists()
    assert Path(purelib, "opencoderouter/static/index.html").exists()  # the dashboard ships with it
    help_text = subprocess.run([str(venv / "bin/python"), "-c", "from twisted.scripts.twistd import run; run()",
                                "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).stdout
    assert "opencoderouter" in help_text
