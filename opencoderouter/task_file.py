"""A dispatch task: the spec's front matter and prompt, parsed and checked; the exit codes and the one error.

A task is optional YAML front matter (``project`` required, ``model`` as ``provider/model``, ``agent``,
``title``, ``permissions``, ``timeout``), then the prompt::

    ---
    project: Archer
    model: anthropic/claude-sonnet-4-5
    ---
    Fix the login timeout bug in the auth module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from .config import parse_duration

EXIT_DONE = 0
EXIT_SESSION_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

PERMISSION_REPLIES = ("reject", "once", "always")
_MODEL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)/(\S+)$")
_FRONT_MATTER_KEYS = ("project", "model", "agent", "title", "permissions", "timeout")


class DispatchError(Exception):
    """A dispatch that cannot go on: ``exit_code`` and a sentence for the user."""

    def __init__(self, exit_code: int, message: str, status: str = "failed") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.status = status


@dataclass
class Task:
    """What to run where: the project, the prompt and optional model/agent/title."""

    project: str
    prompt: str
    model: str | None = None
    agent: str | None = None
    title: str | None = None
    #: How to answer permission requests (``reject``/``once``/``always``); None: the dispatcher's policy.
    permissions: str | None = None
    #: Abort the session after this many seconds; None: the dispatcher's timeout.
    timeout: float | None = None

    def model_ref(self) -> dict[str, str] | None:
        """``{"providerID", "modelID"}`` for the prompt body, or None for the server's default."""
        if self.model is None:
            return None
        match = _MODEL.match(self.model)
        assert match, "parse_task validates the model"
        return {"providerID": match.group(1), "modelID": match.group(2)}


def parse_task(text: str, project: str | None = None, model: str | None = None, agent: str | None = None,
               title: str | None = None) -> Task:
    """Parse a task (front matter + prompt); flags given here override the front matter."""
    meta: dict[str, Any] = {}
    body = text.lstrip("\ufeff")
    lines = body.splitlines()
    if lines and lines[0].strip() == "---":
        for index in range(1, len(lines)):
            if lines[index].strip() in ("---", "..."):
                front, rest = "\n".join(lines[1:index]), lines[index + 1:]
                break
        else:
            raise DispatchError(EXIT_BAD_INPUT,
                                "malformed front matter: the opening '---' line has no closing '---' line", "bad_input")
        try:
            loaded = yaml.safe_load(front)
        except yaml.YAMLError as error:
            detail = str(error).replace("\n", " ")
            raise DispatchError(EXIT_BAD_INPUT, f"malformed front matter: {detail}", "bad_input") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DispatchError(EXIT_BAD_INPUT, f"malformed front matter: expected 'key: value' lines, got {front!r}",
                                "bad_input")
        meta = loaded or {}
        body = "\n".join(rest)
    for key in _FRONT_MATTER_KEYS:
        value = meta.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            raise DispatchError(EXIT_BAD_INPUT, f"front matter field {key!r} must be text, got {value!r}", "bad_input")
    chosen_project = project if project is not None else _text(meta.get("project"))
    if not chosen_project or not chosen_project.strip():
        raise DispatchError(EXIT_BAD_INPUT, "no project: put 'project: NAME' in the front matter or pass --project",
                            "bad_input")
    chosen_model = model if model is not None else _text(meta.get("model"))
    if chosen_model is not None and not _MODEL.match(chosen_model):
        raise DispatchError(EXIT_BAD_INPUT,
                            f"model {chosen_model!r} is not provider/model (e.g. anthropic/claude-sonnet-4-5)",
                            "bad_input")
    prompt = body.strip("\n")
    if not prompt.strip():
        raise DispatchError(EXIT_BAD_INPUT, "the task has no prompt: write it after the front matter", "bad_input")
    permissions = _text(meta.get("permissions"))
    if permissions is not None and permissions not in PERMISSION_REPLIES:
        choices = ", ".join(PERMISSION_REPLIES)
        raise DispatchError(EXIT_BAD_INPUT, f"permissions {permissions!r} is not one of {choices}", "bad_input")
    timeout = _text(meta.get("timeout"))
    seconds: float | None = None
    if timeout is not None:
        try:
            seconds = parse_duration(timeout)
        except ValueError as error:
            raise DispatchError(EXIT_BAD_INPUT, f"timeout: {error}", "bad_input") from None
        if seconds <= 0:
            raise DispatchError(EXIT_BAD_INPUT, f"timeout {timeout!r} must be longer than zero", "bad_input")
    return Task(project=chosen_project.strip(), prompt=prompt, model=chosen_model,
                agent=agent if agent is not None else _text(meta.get("agent")),
                title=title if title is not None else _text(meta.get("title")),
                permissions=permissions, timeout=seconds)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
