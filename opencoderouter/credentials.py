"""Credential files: the router's token, its bcrypt user lines, the backends' password, other secrets.

Every secret the router reads from a file goes through :func:`read_secret_file`: at most 1 MiB, a
warning when the file is readable by other users, and the contents never logged.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

log = Logger()

_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")


def read_secret_file(path: str, flag: str) -> bytes:
    """A credential file's bytes (at most 1 MiB); a warning when other users can read it; never logged."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(1 << 20)
    except OSError as error:
        raise ValueError(f"--{flag}: cannot read {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("--{flag}: {path} is readable by other users; chmod 600 it", flag=flag, path=path)
    return data


def load_token(path: str) -> bytes:
    """The router token from ``--auth-token-file`` (first non-empty line; 16+ characters)."""
    data = read_secret_file(path, "auth-token-file")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--auth-token-file: {path} is empty; put one token (16+ characters) in it")
    token = lines[0]
    if len(token) < 16 or any(c < 0x21 or c > 0x7E for c in token):
        raise ValueError(
            f"--auth-token-file: the token in {path} must be at least 16 printable characters without spaces"
        )
    return token


def load_basic_users(path: str) -> dict[str, bytes]:
    """``user:bcrypt-hash`` lines from ``--basic-auth-file`` (``#`` comments, blank lines ignored)."""
    data = read_secret_file(path, "basic-auth-file")
    users: dict[str, bytes] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        if not colon or not user or not hashed.startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            raise ValueError(
                f"--basic-auth-file: line {number} of {path} is not 'user:bcrypt-hash' "
                "(make one with: python -c "
                "\"import bcrypt;print(bcrypt.hashpw(b'PASSWORD', bcrypt.gensalt()).decode())\")"
            )
        users[user.decode("utf-8", "replace")] = hashed
    if not users:
        raise ValueError(f"--basic-auth-file: {path} has no 'user:bcrypt-hash' line")
    return users


def load_password(path: str) -> str:
    """The backends' ``OPENCODE_SERVER_PASSWORD`` from ``--opencode-password-file`` (first line)."""
    data = read_secret_file(path, "opencode-password-file")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--opencode-password-file: {path} is empty")
    return lines[0].decode("utf-8", "replace")
