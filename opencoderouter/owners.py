"""``--owners``: whose discovered OpenCode servers the router registers, routes and advertises.

Every OpenCode server runs shell commands as its owner; a router started by alice does not hand
bob's agent to the LAN unless told to (``--owners self,bob`` or ``all``).
"""

from __future__ import annotations

import pwd


class OwnerFilter:
    """``--owners``: whose discovered instances are registered and routed."""

    def __init__(self, spec: str, os_user: str) -> None:
        self.spec = spec
        self.os_user = os_user
        words = [w.strip() for w in spec.split(",") if w.strip()]
        if not words:
            raise ValueError(f"{spec!r} names no owner (use self, all, or user names separated by commas)")
        self.everyone = "all" in words
        if self.everyone and len(words) > 1:
            raise ValueError(f"{spec!r} mixes 'all' with names; use just all")
        names: set[str] = set()
        for word in words:
            if word == "all":
                continue
            if word == "self":
                names.add(os_user)
                continue
            try:
                names.add(pwd.getpwuid(int(word)).pw_name if word.isdigit() else pwd.getpwnam(word).pw_name)
            except (KeyError, ValueError):
                if word.isdigit():
                    names.add(word)  # a uid without a passwd entry is reported as its number
                else:
                    raise ValueError(f"{word!r} is not a user on this machine") from None
        self.names = frozenset(names)

    def is_self(self, owner: str | None) -> bool:
        """True for the router's own user, or an owner that could not be known."""
        return owner is None or owner == self.os_user

    def admits(self, owner: str | None) -> bool:
        """True when an instance owned by ``owner`` may be registered."""
        if self.everyone:
            return True
        return (self.os_user if owner is None else owner) in self.names
