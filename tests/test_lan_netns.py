"""The LAN directory between real routers: machines in network namespaces on one bridge (as root).

Machines: ``a`` (router of alice, port 8080), ``b`` (router of bob, port 8181), ``c`` (a client; also
where third-party services, a real ``opencode serve --mdns`` and hostile announcements come from) and
``dns`` (bind9, for wide-area DNS-SD). Every namespace, process and file is removed afterwards.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lan_netns import Bridge, netns_unavailable
from .real_opencode import opencode_binary, opencode_env, seed_home
from .support import subprocess_env, wait_for

_why_not = netns_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

PORT_A, PORT_B = 8080, 8181
SCAN = ["--scan-start", "30000", "--scan-end", "30005", "--scan-interval", "1s"]


@pytest.fixture(scope="module")
def lan() -> Iterator[Bridge]:
    network = Bridge(["a", "b", "c", "dns"])
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(autouse=True)
def own_processes(lan: Bridge) -> Iterator[None]:
    mark = lan.checkpoint()
    yield
    lan.stop_since(mark)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def lan_entries(lan: Bridge, role: str, port: int) -> list[dict[str, Any]]:
    body = lan.json(role, f"http://127.0.0.1:{port}/api/lan")
    return [entry for host in body["hosts"] for entry in host["entries"]]


def wait_listed(lan: Bridge, role: str, port: int, predicate: Any, timeout: float, what: str) -> tuple[Any, float]:
    """Poll a router's /api/lan until ``predicate(entries)`` is truthy; returns (value, seconds waited)."""
    began = time.monotonic()
    value = wait_for(lambda: predicate(lan_entries(lan, role, port)), timeout, interval=0.1, what=what)
    return value, time.monotonic() - began


def by_project(name: str) -> Any:
    return lambda entries: [e for e in entries if e["project_name"] == name]


def start_pair(lan: Bridge, *extra: str) -> tuple[str, str, Any, Any]:
    alpha, beta = unique("alpha"), unique("beta")
    lan.start_backend("a", lan.tmp / alpha, 30001)
    lan.start_backend("b", lan.tmp / beta, 30001)
    router_a = lan.start_router("a", "--username", "alice", *SCAN, *extra, port=PORT_A)
    router_b = lan.start_router("b", "--username", "bob", *SCAN, *extra, port=PORT_B)
    return alpha, beta, router_a, router_b


def test_routers_list_each_others_projects_and_a_client_reaches_one_through_the_other(lan):
    alpha, beta, _, _ = start_pair(lan)
    [seen_b], after_b = wait_listed(lan, "a", PORT_A, by_project(beta), 2 + 3, "router a to list b's project")
    [seen_a], after_a = wait_listed(lan, "b", PORT_B, by_project(alpha), 2, "router b to list a's project")
    assert seen_b["kind"] == "router" and seen_b["owner"] == "bob" and seen_b["addresses"] == [lan.address["b"]]
    assert seen_b["url"] == f"http://{lan.address['b']}:{PORT_B}/{beta}/"
    assert seen_b["host_url"] == f"http://{beta}-bob.local:{PORT_B}/"
    assert seen_b["project_path"] == str(lan.tmp / beta) and seen_b["version"] == "1.18.33-fake"
    # Each router's own projects are not listed by itself.
    assert not by_project(alpha)(lan_entries(lan, "a", PORT_A))
    assert not by_project(beta)(lan_entries(lan, "b", PORT_B))

    # The client asks router a for b's project and reaches it through b's URL.
    resolved = lan.json("c", f"http://{lan.address['a']}:{PORT_A}/api/resolve?name={beta}&scope=lan")
    assert resolved["scope"] == "lan" and resolved["url"] == seen_b["url"]
    answer = lan.http("c", resolved["url"] + "path")
    assert answer["status"] == 200 and json.loads(answer["body"])["directory"] == str(lan.tmp / beta)
    # A local match wins over the network, and scope=local (the default) stays local.
    local = lan.json("c", f"http://{lan.address['a']}:{PORT_A}/api/resolve?name={alpha}&scope=lan")
    assert local["url"] == f"http://{lan.address['a']}:{PORT_A}/{alpha}/" and "scope" not in local
    assert lan.http("c", f"http://{lan.address['a']}:{PORT_A}/api/resolve?name={beta}")["status"] == 404

    # opencoderouter-dispatch pointed at router a runs a task on b's project.
    task = lan.tmp / "task.md"
    task.write_text(f"---\nproject: {beta}\n---\nSay hello.\n")
    dispatched = lan.run("c", [sys.executable, "-m", "opencoderouter.dispatch", "--router",
                               f"http://{lan.address['a']}:{PORT_A}", "--json", str(task)], timeout=60,
                         env=subprocess_env())
    assert dispatched.returncode == 0, dispatched.stderr
    result = json.loads(dispatched.stdout)
    assert result["status"] == "done" and result["url"] == seen_b["url"], result
    print(f"\nlisted on the other router {after_b:.2f}s / {after_a:.2f}s after both routers answered")


@pytest.mark.long  # waits out the records' 120 s TTL: started first, on a worker of its own
def test_a_stopped_router_vanishes_at_once_and_a_killed_one_when_its_records_expire(lan):
    alpha, beta, _, router_b = start_pair(lan)
    wait_listed(lan, "a", PORT_A, by_project(beta), 5, "router a to list b's project")
    lan.stop(router_b, signal.SIGTERM)
    _, gone_after = wait_listed(lan, "a", PORT_A, lambda e: not by_project(beta)(e), 2, "b's goodbye")

    router_b = lan.start_router("b", "--username", "bob", *SCAN, port=PORT_B)
    [entry], _ = wait_listed(lan, "a", PORT_A, by_project(beta), 5, "b's project again")
    ttl_left = entry["expires_unix"] - time.time()
    assert 100 < ttl_left <= 120  # the SRV/A records' 120 s, not zeroconf's 1125 s PTR floor
    lan.stop(router_b, signal.SIGKILL)  # no goodbye
    killed = time.monotonic()
    time.sleep(60)
    assert by_project(beta)(lan_entries(lan, "a", PORT_A)), "gone before its records expired"
    _, expired_after = wait_listed(lan, "a", PORT_A, lambda e: not by_project(beta)(e), ttl_left + 5,
                                   "b's project to expire")
    print(f"\ngoodbye removed it after {gone_after:.2f}s; after SIGKILL it expired "
          f"{time.monotonic() - killed:.1f}s later (records' TTL left then: {ttl_left:.0f}s)")


def test_third_party_avahi_service_and_a_real_opencode_mdns_server_are_listed(lan, tmp_path):
    lan.start_router("a", "--username", "alice", *SCAN, port=PORT_A)
    env = lan.start_avahi("c")
    name = unique("thirdparty")
    began = time.monotonic()
    publisher = lan.spawn("c", ["avahi-publish", "-s", name, "_opencode._tcp", "9999", f"project={name}",
                                "owner=carol", "path_prefix=/tp/"], "avahi-publish", env=env)
    [entry], after = wait_listed(lan, "a", PORT_A, by_project(name), 5, "the avahi-published service")
    assert entry["addresses"] == [lan.address["c"]] and entry["port"] == 9999 and entry["owner"] == "carol"
    assert entry["url"] == f"http://{lan.address['c']}:9999/tp/"
    published_after = time.monotonic() - began
    lan.stop(publisher)  # avahi sends goodbyes
    _, gone_after = wait_listed(lan, "a", PORT_A, lambda e: not by_project(name)(e), 2, "avahi's goodbye")
    print(f"\navahi-publish: listed {published_after:.2f}s after it started, removed {gone_after:.2f}s after it stopped")

    binary = opencode_binary()
    if binary is None:
        pytest.skip("the real opencode is not installed (tests/setup/install-opencode.sh)")
    project = lan.tmp / unique("plain")
    project.mkdir()
    home = seed_home(tmp_path / "home")
    began = time.monotonic()
    lan.spawn("c", [str(binary), "serve", "--mdns", "--port", "14200"], "opencode-c", cwd=str(project),
              env=opencode_env(home, "http://127.0.0.1:9"))
    [plain], _ = wait_listed(lan, "a", PORT_A, lambda es: [e for e in es if e["instance"] == "opencode-14200"], 30,
                             "the real opencode serve --mdns")
    assert plain["kind"] == "opencode" and plain["behind_router"] is False
    assert plain["addresses"] == [lan.address["c"]] and plain["port"] == 14200
    assert plain["url"] == f"http://{lan.address['c']}:14200/" and plain["host_url"] is None
    assert plain["host"] == "opencode.local"
    print(f"real opencode serve --mdns listed {time.monotonic() - began:.1f}s after it was started")


def announcer(lan: Bridge, services: list[dict[str, Any]], name: str) -> subprocess.Popen[bytes]:
    spec = lan.tmp / f"{name}.json"
    spec.write_text(json.dumps({"address": lan.address["c"], "services": services, "repeat": 2}))
    process = lan.spawn("c", [sys.executable, "-m", "tests.mdns_announcer", str(spec)], name, env=subprocess_env())
    wait_for(lambda: "announced" in lan.log(name), 30, interval=0.1, what=f"{name} to announce")
    return process


def txt(*pairs: bytes) -> str:
    return b"".join(bytes([len(p)]) + p for p in pairs).hex()


def service(instance: str, txt_hex: str, port: int = 8080, ttl: int = 120, **extra: Any) -> dict[str, Any]:
    return {"instance": instance, "type": "_opencode._tcp.local.", "port": port, "server": f"h{secrets.token_hex(4)}.local.",
            "ttl": ttl, "txt_hex": txt_hex, **extra}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_hostile_announcements_are_bounded_escaped_and_never_taken_for_us(lan):
    alpha = unique("alpha")
    lan.start_backend("a", lan.tmp / alpha, 30001)
    router = lan.start_router("a", "--username", "alice", *SCAN, port=PORT_A)
    wait_for(lambda: any(b["mdns_name"] for b in lan.json("a", f"http://127.0.0.1:{PORT_A}/api/backends")), 10,
             what="a's own advertisement")
    before = rss_kib(router.pid)

    flood = [service(f"flood{n}", txt(b"project=flood%d" % n, b"path_prefix=/flood%d/" % n)) for n in range(1000)]
    began = time.monotonic()
    flooder = announcer(lan, flood, "flood")
    count, _ = wait_listed(lan, "a", PORT_A, lambda es: len(es) >= 64 and len(es), 20, "the flood to be listed")
    time.sleep(2)  # every packet has arrived and been handled by now
    body = lan.json("a", f"http://127.0.0.1:{PORT_A}/api/lan")
    assert body["count"] == 64 and [len(h["entries"]) for h in body["hosts"]] == [64]
    health_began = time.monotonic()
    assert lan.http("a", f"http://127.0.0.1:{PORT_A}/api/health")["status"] == 200
    health_took = time.monotonic() - health_began
    grown = rss_kib(router.pid) - before
    assert grown < 40 * 1024, f"the router grew by {grown} KiB"
    assert "announces more than 64 services; only the first 64 are listed" in lan.log("router-a")
    print(f"\n1,000 services from one host: 64 listed after {time.monotonic() - began:.1f}s, router RSS +{grown} KiB, "
          f"/api/health answered in {health_took * 1000:.0f} ms")
    lan.stop(flooder)  # SIGTERM: the flood says goodbye
    wait_listed(lan, "a", PORT_A, lambda es: not es, 10, "the flood's goodbyes")

    big = b"x" * 240
    hostile = [
        service("bigtxt", txt(b"project=big" + big[:230], *[b"k%02d=" % n + big for n in range(32)])),
        service("badutf8", txt(b"project=bad\xff\xfeutf8", b"path=/home/\xc3\x28/x"), raw_label=b"bad\xffutf".hex()),
        service("<script>alert(1)</script>", txt(b"project=<script>alert(2)</script>", b"owner=<b>eve</b>")),
        service(f"{alpha}-alice", txt(b"project=" + alpha.encode(), b"owner=alice", b"path_prefix=/evil/")),
        service("shortlived", txt(b"project=shortlived"), ttl=4),
    ]
    hostile_process = announcer(lan, hostile, "hostile")
    entries, _ = wait_listed(lan, "a", PORT_A, lambda es: len(es) >= 4 and es, 10, "the hostile services")
    by_name = {e["project_name"]: e for e in entries}
    assert len(by_name["big" + "x" * 230]["project_name"]) == 233 and "k00" not in json.dumps(by_name)
    assert "bad\ufffd\ufffdutf8" in by_name and by_name["bad\ufffd\ufffdutf8"]["project_path"] == "/home/\ufffd(/x"
    assert by_name["bad\ufffd\ufffdutf8"]["instance"] == "bad\ufffdutf"
    assert by_name["<script>alert(2)</script>"]["instance"] == "<script>alert(1)</script>"
    assert by_name["<script>alert(2)</script>"]["owner"] == "<b>eve</b>"
    assert alpha not in by_name  # it claims to be us: not listed
    assert f"announces {alpha}-alice, a name this router advertises; not listed" in lan.log("router-a")
    assert lan.json("a", f"http://127.0.0.1:{PORT_A}/api/resolve?name={alpha}&scope=lan")["url"].startswith(
        f"http://127.0.0.1:{PORT_A}/{alpha}/")

    # SIGKILL: no goodbye; the 4 s records are asked for again, get no answer and expire.
    lan.stop(hostile_process, signal.SIGKILL)
    killed = time.monotonic()
    wait_listed(lan, "a", PORT_A, lambda es: "shortlived" not in {e["project_name"] for e in es}, 10,
                "the 4 s TTL to run out")
    print(f"a 4 s TTL service without goodbye was dropped {time.monotonic() - killed:.1f}s after its announcer died")


# -- wide-area DNS-SD against bind9 ----------------------------------------------------------------------------------

NAMED_CONF = """include "{d}/ocr.key";
options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    listen-on port 53 {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    allow-query {{ any; }};
    dnssec-validation no;
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
}};
controls {{ }};
zone "example.org" {{
    type primary;
    file "{d}/example.org.db";
    journal "{d}/example.org.db.jnl";
    allow-update {{ key "ocr-key"; }};
}};
"""

ZONE = """$TTL 60
@   IN SOA ns1.example.org. hostmaster.example.org. ( 1 60 30 600 60 )
    IN NS  ns1.example.org.
ns1 IN A   {address}
_opencode._tcp IN PTR delta-dave._opencode._tcp
delta-dave._opencode._tcp IN SRV 0 0 8282 dave
delta-dave._opencode._tcp IN TXT "project=delta" "owner=dave" "path=/home/dave/delta" "path_prefix=/delta/"
dave IN A 10.99.0.77
"""


def dig(lan: Bridge, name: str, rdtype: str) -> list[str]:
    result = lan.run("c", ["dig", f"@{lan.address['dns']}", name, rdtype, "+short", "+time=2", "+tries=2"])
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("named") is None or shutil.which("tsig-keygen") is None or shutil.which("dig") is None,
                    reason="needs bind9 and bind9-dnsutils (tests/setup/install-system-deps.sh)")
def test_wide_area_dns_sd_with_bind9_browses_registers_and_deletes(lan):
    folder = lan.tmp / unique("bind")
    folder.mkdir()
    key = subprocess.run(["tsig-keygen", "-a", "hmac-sha256", "ocr-key"], capture_output=True, text=True, check=True)
    (folder / "ocr.key").write_text(key.stdout)
    (folder / "ocr.key").chmod(0o600)
    (folder / "named.conf").write_text(NAMED_CONF.format(d=folder, address=lan.address["dns"]))
    (folder / "example.org.db").write_text(ZONE.format(address=lan.address["dns"]))
    lan.spawn("dns", ["named", "-g", "-c", str(folder / "named.conf")], "named")
    wait_for(lambda: dig(lan, "example.org", "SOA"), 20, interval=0.2, what="named to answer")

    alpha, beta = unique("alpha"), unique("beta")
    lan.start_backend("a", lan.tmp / alpha, 30001)
    lan.start_backend("b", lan.tmp / beta, 30001)
    wide = ["--mdns=false", "--dnssd-domain", "example.org", "--dnssd-server", lan.address["dns"],
            "--dnssd-interval", "1s"]
    router_a = lan.start_router("a", "--username", "alice", *SCAN, *wide, "--dnssd-update-key",
                                str(folder / "ocr.key"), port=PORT_A)
    lan.start_router("b", "--username", "bob", *SCAN, *wide, port=PORT_B)

    # Router a registered its project with a signed UPDATE; bind answers for it.
    instance = f"{alpha}-alice._opencode._tcp.example.org."
    wait_for(lambda: instance in dig(lan, "_opencode._tcp.example.org", "PTR"), 10, interval=0.2,
             what="a's registration in bind")
    assert dig(lan, instance, "SRV") == [f"0 0 {PORT_A} {alpha}-alice.example.org."]
    assert dig(lan, f"{alpha}-alice.example.org", "A") == [lan.address["a"]]
    assert f'"path_prefix=/{alpha}/"' in dig(lan, instance, "TXT")[0]

    # Router b (no mDNS at all) lists both the static entry and a's project from DNS.
    def both(entries: list[dict[str, Any]]) -> Any:
        names = {e["project_name"]: e for e in entries}
        return (alpha in names and "delta" in names) and names

    listed, after = wait_listed(lan, "b", PORT_B, both, 10, "b to browse the zone")
    assert listed["delta"]["source"] == "dnssd" and listed["delta"]["url"] == "http://10.99.0.77:8282/delta/"
    assert listed[alpha]["url"] == f"http://{lan.address['a']}:{PORT_A}/{alpha}/"
    assert listed[alpha]["host_url"] == f"http://{alpha}-alice.example.org:{PORT_A}/"
    resolved = lan.json("c", f"http://{lan.address['b']}:{PORT_B}/api/resolve?name={alpha}&scope=lan")
    assert resolved["url"] == listed[alpha]["url"]
    # Router a lists what is in the zone, but not its own registration.
    wait_listed(lan, "a", PORT_A, by_project("delta"), 5, "a to browse the zone")
    assert not by_project(alpha)(lan_entries(lan, "a", PORT_A))

    # Without the key, the same kind of update is refused (the zone is not open to anyone).
    unsigned = lan.tmp / "unsigned.nsupdate"
    unsigned.write_text(f"server {lan.address['dns']} 53\nzone example.org\n"
                        "update add evil._opencode._tcp.example.org. 60 IN TXT \"x=1\"\nsend\n")
    refused = lan.run("c", ["nsupdate", str(unsigned)])
    assert refused.returncode != 0 and "REFUSED" in refused.stdout + refused.stderr

    lan.stop(router_a, signal.SIGTERM)
    assert instance not in dig(lan, "_opencode._tcp.example.org", "PTR")
    assert dig(lan, instance, "SRV") == [] and dig(lan, f"{alpha}-alice.example.org", "A") == []
    assert "registrations in example.org withdrawn" in lan.log("router-a")
    wait_listed(lan, "b", PORT_B, lambda es: alpha not in {e["project_name"] for e in es}, 5,
                "b to drop a's project after the next browse")
    print(f"\nwide-area: b listed a's registration {after:.1f}s after both routers answered")


# -- the dashboard in Chromium ----------------------------------------------------------------------------------------

_SELENIUM = """
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
url, project, profile = sys.argv[1], sys.argv[2], sys.argv[3]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--window-size=1280,900", "--user-data-dir=" + profile):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url)
    def row(d):
        rows = [r for r in d.find_elements(By.CSS_SELECTOR, "#lan tr[data-lan-id]") if project in r.text]
        return rows[0] if rows else None
    WebDriverWait(driver, 10, poll_frequency=0.1).until(row)
    found = row(driver)
    out = {"heading": driver.find_element(By.CSS_SELECTOR, "#lan h2").text,
           "hidden": driver.execute_script("return document.getElementById('lan').hidden"),
           "row": found.text, "links": [a.get_attribute("href") for a in found.find_elements(By.CSS_SELECTOR, "a")],
           "hosts": [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#lan h3")],
           "markup": driver.execute_script("return document.querySelectorAll('#lan img, #lan script, #lan b').length"),
           "xss": driver.execute_script("return window.__xss === undefined ? null : window.__xss"),
           "names": [n.text for n in driver.find_elements(By.CSS_SELECTOR, "#lan .project-name")]}
    print(json.dumps(out))
finally:
    driver.quit()
"""


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (tests/setup/install-system-deps.sh)")
def test_chromium_shows_the_other_routers_project_with_its_port(lan):
    pytest.importorskip("selenium")
    alpha, beta, _, _ = start_pair(lan)
    hostile = '<img src=x onerror="window.__xss=1"><b>x</b><script>window.__xss=2</script>'
    announcer(lan, [service("hostile", txt(b"project=" + hostile.encode(), b"path_prefix=/hostile/"))], "xss")
    wait_listed(lan, "a", PORT_A, by_project(beta), 5, "router a to list b's project")
    wait_listed(lan, "a", PORT_A, by_project(hostile), 5, "router a to list the hostile service")
    script = lan.tmp / "lan_selenium.py"
    script.write_text(_SELENIUM)
    result = lan.run("c", [sys.executable, str(script), f"http://{lan.address['a']}:{PORT_A}/", beta,
                           str(lan.tmp / unique("chromium"))], timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    page = json.loads(result.stdout.splitlines()[-1])
    assert page["heading"] == "On the network" and page["hidden"] is False
    assert beta in page["row"] and "bob" in page["row"] and "via router" in page["row"]
    assert f"http://{lan.address['b']}:{PORT_B}/{beta}/" in page["links"]
    assert f"http://{beta}-bob.local:{PORT_B}/" in page["links"]
    assert any(h.startswith(lan.address["b"]) for h in page["hosts"])
    # The hostile project name is shown as text, never parsed as markup.
    assert hostile in page["names"] and page["markup"] == 0 and page["xss"] is None
