"""The PyPy option of the benchmark (``run.py --pypy``): a PyPy venv with the router's dependencies.

Debian's ``pypy3`` is PyPy 7.3.11 (Python 3.9). Its dependencies install with ``pip --prefer-binary``
once ``cryptography`` is held at 43 and ``bcrypt`` below 4.3 (the last releases with PyPy 3.9 wheels;
newer ones build from source with Rust, and this machine has no crates.io). The venv lives in the cache folder the pinned opencode uses,
so it is made once per machine. Nothing here changes the router's code: when the unchanged code cannot
start on Python 3.9, ``start_failure`` says why, and ``py310_shim`` can supply what it lacks (``typing``
names from ``typing_extensions``; ``dataclass(slots=True)`` accepted and ignored) so the bench can still
measure the interpreter (reported as such).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from common import code_under_test

#: Held so that every dependency has a PyPy 3.9 wheel (see the module docstring). The last two follow
#: from cryptography 43: pyOpenSSL 25.2 and Twisted 26's ``tls`` extra need cryptography 45; without them
#: pip backtracks through every older release of the other dependencies for a quarter of an hour.
CONSTRAINTS = ("cryptography>=43,<44", "bcrypt<4.3", "pyopenssl<25.2", "twisted<26")
#: What the router imports beyond pyproject's dependencies when a typing shim is needed.
EXTRA = ("typing_extensions",)
#: A bounded pip: the first install compiles PyYAML and zope.interface (about 2 minutes on 2 cores).
PIP_TIMEOUT_S = 900


def venv_dir() -> Path:
    """``~/.cache/opencoderouter/pypy3-venv`` (honours XDG_CACHE_HOME)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opencoderouter" / "pypy3-venv"


#: ``dependencies = [...]`` of pyproject's ``[project]`` table: quoted strings, one a line, ``]`` on its own line.
_DEPENDENCIES = re.compile(r"^\[project\][^\[]*?^dependencies\s*=\s*\[(.*?)^\]", re.M | re.S)


def requirements() -> list[str]:
    """The router's dependencies (pyproject's ``[project] dependencies``) plus ``EXTRA``.

    Read from pyproject.toml with a pattern, not tomllib, which Python 3.10 lacks; the list is a flat
    list of strings. The router itself is not installed into the venv (its pyproject asks for
    Python >= 3.10): it runs from the checkout on PYTHONPATH, as every router of the benchmark does.
    """
    match = _DEPENDENCIES.search((code_under_test() / "pyproject.toml").read_text())
    if match is None:
        raise RuntimeError("pyproject.toml has no [project] dependencies list")
    return [*re.findall(r'"([^"]+)"', match.group(1)), *EXTRA]


def ensure_venv(pypy: str) -> Path:
    """The venv's interpreter, creating the venv and installing ``requirements()`` when they changed."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    wanted = "\n".join([*requirements(), *CONSTRAINTS])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([pypy, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    constraints = venv / "bench-constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n")
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--prefer-binary", "-c", str(constraints),
                          *requirements()], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if out.returncode != 0:
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and "WARNING" not in line]
        raise RuntimeError("pip could not install the router's dependencies into the PyPy venv: "
                           + " | ".join(lines[-6:]))
    marker.write_text(wanted)
    return python


def interpreter_version(python: Path) -> str:
    """E.g. ``PyPy 7.3.11 (Python 3.9.16)``."""
    code = ("import platform, sys; v = getattr(sys, 'pypy_version_info', None); "
            "print(platform.python_implementation(), '.'.join(map(str, v[:3])) if v else '', "
            "'(Python ' + platform.python_version() + ')')")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          timeout=60).stdout.strip()


_MISSING_TYPING_NAME = re.compile(r"cannot import name '(\w+)' from 'typing'")
#: The shim name of ``@dataclass(slots=True)`` (Python 3.10), which the shim accepts and ignores.
DATACLASS_SLOTS = "dataclass(slots=)"


def missing_feature(failure: str) -> str | None:
    """What a start-up failure says Python 3.9 lacks: a ``typing`` name (``TypeGuard``, ...) or ``DATACLASS_SLOTS``."""
    if "dataclass() got an unexpected keyword argument 'slots'" in failure:
        return DATACLASS_SLOTS
    match = _MISSING_TYPING_NAME.search(failure)
    return match.group(1) if match else None


def describe_shim(features: list[str]) -> str:
    """E.g. ``typing.TypeGuard from typing_extensions, dataclass(slots=) ignored``."""
    parts = [f"typing.{name} from typing_extensions" for name in features if name != DATACLASS_SLOTS]
    if DATACLASS_SLOTS in features:
        parts.append("dataclass(slots=) ignored")
    return ", ".join(parts)


def py310_shim(folder: Path, features: list[str]) -> Path:
    """A ``sitecustomize`` in ``folder`` supplying ``features``: typing names from typing_extensions, dataclass slots."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [feature for feature in features if feature != DATACLASS_SLOTS]
    text = ('"""Bench-only: the Python 3.10 features the router uses, supplied on Python 3.9."""\n'
            "import typing\n\nimport typing_extensions\n\n"
            f"for _name in {names!r}:\n"
            "    if not hasattr(typing, _name):\n"
            "        setattr(typing, _name, getattr(typing_extensions, _name))\n")
    if DATACLASS_SLOTS in features:
        # Without __slots__ the classes keep a __dict__: more memory per object, the same behaviour.
        text += ("\nimport dataclasses\n\n_dataclass = dataclasses.dataclass\n\n\n"
                 "def _without_slots(cls=None, **kwargs):\n"
                 "    kwargs.pop('slots', None)\n"
                 "    return _dataclass(**kwargs) if cls is None else _dataclass(cls, **kwargs)\n\n\n"
                 "dataclasses.dataclass = _without_slots\n")
    (folder / "sitecustomize.py").write_text(text)
    return folder


def failure_reason(log: str) -> str:
    """The last exception line of a router's log (what made it exit), or its last line."""
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\s*\w+(\.\w+)*(Error|Exception)\b", line)]
    return (errors or lines or ["(no output)"])[-1].strip()
