"""This machine's network interfaces and addresses (``getifaddrs`` through ifaddr), read on demand."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import ifaddr


@dataclass(frozen=True)
class InterfaceAddress:
    """One address of one network interface."""

    interface: str
    index: int | None
    address: str

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The address as an ``ipaddress`` object."""
        return ipaddress.ip_address(self.address)


def system_addresses() -> list[InterfaceAddress]:
    """Every address of every interface on this machine."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            # ifaddr gives IPv6 addresses as (address, flowinfo, scope id) tuples.
            address = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            found.append(InterfaceAddress(adapter.name, adapter.index, address))
    return found


def machine_addresses() -> set[str]:
    """Every address configured on this machine, the loopback ones always included."""
    return {"127.0.0.1", "::1"} | {entry.address.split("%", 1)[0] for entry in system_addresses()}


def reachable_from_elsewhere(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address another machine could reach (not loopback, unspecified, multicast, link-local IPv6)."""
    # IPv6 link-local addresses need a zone (%eth0) that an A/AAAA record or a URL elsewhere cannot carry.
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local))


def selected(entry: InterfaceAddress, selectors: Sequence[str]) -> bool:
    """True when no ``--mdns-interface`` was given, or one names this interface or this address."""
    if not selectors:
        return True
    return any(s == entry.interface or _same_address(s, entry.address) for s in selectors)


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
