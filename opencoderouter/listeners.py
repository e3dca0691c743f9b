"""Listening TCP sockets on localhost, from the kernel: netlink ``sock_diag``, else ``/proc/net/tcp*``.

A socket counts when a local client can reach it: bound to 127.0.0.1, ``0.0.0.0``, ``::`` (dual
stack), ``::ffff:127.0.0.1`` or ``::1``. Each listener says which loopback address to use: 127.0.0.1
whenever the socket takes it, ``::1`` for a socket on the IPv6 loopback only.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

_TCP_LISTEN = "0A"
#: Local addresses (hex as in /proc/net/tcp*) a local client reaches, and the address it connects to.
_REACHABLE_V4 = {"0100007F": "127.0.0.1", "00000000": "127.0.0.1"}
_REACHABLE_V6 = {
    "00000000000000000000000000000000": "127.0.0.1",
    "0000000000000000FFFF00000100007F": "127.0.0.1",
    "00000000000000000000000001000000": "::1",
}


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket in the scan range, from the kernel's socket table."""

    port: int
    uid: int
    inode: int
    #: Where to connect: ``127.0.0.1``, or ``::1`` for a socket on the IPv6 loopback only.
    address: str = "127.0.0.1"


def list_listeners(start: int, end: int, proc_net: str = "/proc/net") -> dict[int, Listener] | None:
    """Listening sockets on ports ``start..end`` a local client can reach, or None where unknown.

    Asks the kernel for listening sockets only (netlink ``sock_diag``, ~0.1 ms) and falls back to
    parsing ``/proc/net/tcp*``, which lists every TCP socket of the machine (thousands on a busy
    box, 10-25 ms of CPU per look: too much for a check that runs twice a second).
    """
    if proc_net == "/proc/net":
        found = netlink_listeners(start, end)
        if found is not None:
            return found
    return proc_listeners(start, end, proc_net)


def proc_listeners(start: int, end: int, proc_net: str = "/proc/net") -> dict[int, Listener] | None:
    """:func:`list_listeners` from the text tables in ``/proc/net``."""
    listeners: dict[int, Listener] = {}
    readable = False
    for name, reachable in (("tcp", _REACHABLE_V4), ("tcp6", _REACHABLE_V6)):
        try:
            with open(os.path.join(proc_net, name), encoding="ascii", errors="replace") as table:
                lines = table.readlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            address, _, port_hex = fields[1].partition(":")
            try:
                port, uid, inode = int(port_hex, 16), int(fields[7]), int(fields[9])
            except ValueError:
                continue
            if start <= port <= end and address in reachable and _better(listeners.get(port), reachable[address]):
                listeners[port] = Listener(port, uid, inode, reachable[address])
    return listeners if readable else None


def _better(known: Listener | None, address: str) -> bool:
    """Whether a socket reached at ``address`` should replace what is known for its port (127.0.0.1 wins)."""
    return known is None or (known.address != "127.0.0.1" and address == "127.0.0.1")


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCPF_LISTEN = 1 << 10
_LOOPBACK_OR_ANY = {
    socket.AF_INET: {bytes(4): "127.0.0.1", bytes([127, 0, 0, 1]): "127.0.0.1"},
    socket.AF_INET6: {
        bytes(16): "127.0.0.1",
        bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]): "127.0.0.1",
        bytes(15) + b"\x01": "::1",
    },
}


def netlink_listeners(start: int, end: int) -> dict[int, Listener] | None:
    """:func:`list_listeners` from the kernel's ``sock_diag`` netlink interface (Linux), else None."""
    if not hasattr(socket, "AF_NETLINK"):
        return None
    listeners: dict[int, Listener] = {}
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            reachable = _LOOPBACK_OR_ANY[family]
            for port, address, uid, inode in _sock_diag_dump(family):
                if start <= port <= end and address in reachable and _better(listeners.get(port), reachable[address]):
                    listeners[port] = Listener(port, uid, inode, reachable[address])
    except (OSError, struct.error):
        return None
    return listeners


def _sock_diag_dump(family: int) -> Iterable[tuple[int, bytes, int, int]]:
    """(port, local address, uid, inode) of every listening TCP socket of one address family."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        # struct inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid.
        request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN) + bytes(48)
        sock.send(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0) + request)
        address_size = 4 if family == socket.AF_INET else 16
        for _ in range(10_000):  # a dump is a few messages; the bound only guards against a broken kernel
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag answered an error")
                # struct inet_diag_msg: 4 bytes, inet_diag_sockid (sport big-endian, dport, src[16], ...),
                # then expires, rqueue, wqueue, uid, inode.
                port = struct.unpack_from("!H", data, offset + 20)[0]
                address = data[offset + 24 : offset + 24 + address_size]
                uid, inode = struct.unpack_from("=II", data, offset + 80)
                yield port, address, uid, inode
                offset += (length + 3) & ~3
            if not data:
                return


def username_for_uid(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
