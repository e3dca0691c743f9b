"""A hostile mDNS announcer for tests: sends unsolicited answers for made-up services, answers nothing.

Run inside a test network namespace (never on a real interface)::

    python -m tests.mdns_announcer SPEC.json

SPEC is ``{"address": "10.x.y.3", "services": [{"instance", "type", "port", "server", "ttl",
"txt_hex", "raw_label"?}], "repeat": 2}``: each service becomes PTR + SRV + TXT + A records (``ttl`` for
SRV/TXT/A, 4500 s for the PTR), announced ``repeat`` times a second apart; then the process sleeps
until it is killed (SIGTERM sends goodbyes, TTL 0; SIGKILL leaves the records to expire). ``txt_hex``
is the raw TXT rdata (length-prefixed strings), so values can be any bytes. ``raw_label`` (hex)
replaces the instance label's bytes in the packets, of the same length, for names that are not UTF-8.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from typing import Any

from zeroconf import DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText

_RESPONSE = 0x8400  # QR + AA
_CLASS_IN, _UNIQUE = 1, 0x8000
_TYPE_A, _TYPE_PTR, _TYPE_TXT, _TYPE_SRV = 1, 12, 16, 33


def packets(spec: dict[str, Any], goodbye: bool) -> list[bytes]:
    """The announcement (or goodbye) packets for every service in ``spec``."""
    out = DNSOutgoing(_RESPONSE, multicast=True)
    address = socket.inet_aton(spec["address"])
    replacements = []
    for service in spec["services"]:
        ttl = 0 if goodbye else service["ttl"]
        name = f"{service['instance']}.{service['type']}"
        out.add_answer_at_time(DNSPointer(service["type"], _TYPE_PTR, _CLASS_IN, 0 if goodbye else 4500, name), 0)
        out.add_answer_at_time(DNSService(name, _TYPE_SRV, _CLASS_IN | _UNIQUE, ttl, 0, 0, service["port"],
                                          service["server"]), 0)
        out.add_answer_at_time(DNSText(name, _TYPE_TXT, _CLASS_IN | _UNIQUE, ttl, bytes.fromhex(service["txt_hex"])),
                               0)
        out.add_answer_at_time(DNSAddress(service["server"], _TYPE_A, _CLASS_IN | _UNIQUE, ttl, address), 0)
        if service.get("raw_label"):
            placeholder = service["instance"].encode("utf-8")
            replacements.append((bytes([len(placeholder)]) + placeholder,
                                 bytes([len(placeholder)]) + bytes.fromhex(service["raw_label"])))
    sent = []
    for packet in out.packets():
        for old, new in replacements:
            packet = packet.replace(old, new)
        sent.append(packet)
    return sent


def main() -> None:
    """Announce, then wait; goodbyes on SIGTERM."""
    spec = json.loads(open(sys.argv[1]).read())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(spec["address"]))
    sock.bind((spec["address"], 0))

    def send(goodbye: bool) -> None:
        for packet in packets(spec, goodbye):
            sock.sendto(packet, ("224.0.0.251", 5353))
            time.sleep(0.002)  # a little pacing, so the receivers' socket buffers are not overrun

    def stop(*_: object) -> None:
        send(goodbye=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    for n in range(spec.get("repeat", 2)):
        if n:
            time.sleep(1)
        send(goodbye=False)
    print("announced", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
