"""Logs: structured fields, JSON lines for ``twistd --logger``, no per-probe noise by default."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger, LogLevel, globalLogPublisher

from opencoderouter.logs import (
    JSONLinesObserver,
    level_from_environment,
    router_observer,
)

from .support import free_port, free_port_block, http_get, subprocess_env, wait_for


def test_json_lines_carry_message_level_and_structured_fields():
    out = io.StringIO()
    log = Logger(namespace="opencoderouter.registry", observer=JSONLinesObserver(out))
    log.info("backend {slug} appeared on port {port}", slug="alpha", port=30001, event="backend_added")
    try:
        int("not a number")
    except ValueError:
        log.failure("scan failed", event="scan_failed")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["message"] == "backend alpha appeared on port 30001"
    assert (first["level"], first["namespace"]) == ("info", "opencoderouter.registry")
    assert (first["slug"], first["port"], first["event"]) == ("alpha", 30001, "backend_added")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "critical" and "ValueError" in second["traceback"]


def test_unencodable_fields_do_not_break_the_line():
    out = io.StringIO()
    Logger(observer=JSONLinesObserver(out)).info("odd {thing!r}", thing=object(), blob=b"\xff")
    record = json.loads(out.getvalue())
    assert record["message"].startswith("odd <object")
    assert record["blob"] == repr(b"\xff")


def test_router_messages_below_info_are_dropped_by_default():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        log = Logger(namespace="opencoderouter.scanner", observer=router_observer)
        log.debug("port {port} is not OpenCode", port=1)
        log.info("kept")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e["log_format"] for e in seen if e.get("log_namespace") == "opencoderouter.scanner"] == ["kept"]


def test_log_level_comes_from_the_environment():
    assert level_from_environment({}) == LogLevel.info
    assert level_from_environment({"OPENCODEROUTER_LOG_LEVEL": "DEBUG"}) == LogLevel.debug
    assert level_from_environment({"OPENCODEROUTER_LOG_LEVEL": "warning"}) == LogLevel.warn
    assert level_from_environment({"OPENCODEROUTER_LOG_LEVEL": "loud"}) == LogLevel.info


def test_twistd_logger_option_writes_json_lines_without_probe_noise(tmp_path, fake_opencode_factory):
    base = free_port_block(2)
    fake_opencode_factory(tmp_path / "alpha", port=base)
    # A listener that never answers HTTP: every scan's probe of it fails (debug level only).
    mute = socket.socket()
    mute.bind(("127.0.0.1", base + 1))
    mute.listen(8)
    log_file = tmp_path / "router.jsonl"
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "--logger=opencoderouter.logs.json_observer", "opencoderouter", "--port", str(port),
         "--hostname", "127.0.0.1", "--mdns=false", "--scan-start", str(base), "--scan-end", str(base + 1),
         "--scan-interval", "300ms", "--probe-timeout", "200ms"],
        env=subprocess_env(OPENCODEROUTER_LOG_FILE=str(log_file)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        def lines() -> list[dict]:
            return [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []

        added = wait_for(lambda: [r for r in lines() if r.get("event") == "backend_added"], what="backend_added")
        assert (added[0]["slug"], added[0]["port"]) == ("alpha", base)
        # The mute port's probes really ran (and timed out) several times...
        wait_for(lambda: _timed_out_probes(port) >= 3, timeout=10, what="timed-out probes")
        # ...and none of them wrote a line.
        assert not [r for r in lines() if r["level"] == "debug"], "per-probe debug lines leaked at the default level"
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(15)
        router.stderr.close()
        mute.close()
    assert any(r["message"] == "Server Shut Down." for r in lines())



def _timed_out_probes(port: int) -> float:
    text = http_get(f"http://127.0.0.1:{port}/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "opencoderouter_probes_total" and sample.labels == {"outcome": "timeout"}:
                return sample.value
    return 0
