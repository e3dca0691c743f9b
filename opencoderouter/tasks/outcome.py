"""How a task's outcome is written where the task came from: a Markdown block, and the session's web UI link."""

from __future__ import annotations

from ..agent_sessions import web_path
from ..links import tunnel_url
from ..registry import Backend
from ..responses import rfc3339
from .journal import TaskRecord


def web_ui_link(backend: Backend, port: int, session_id: str) -> str:
    """The session in OpenCode's web UI through the router's host mode on this machine.

    ``agent_sessions.web_path`` is the route both layouts of the web UI understand; the
    ``{label}.localhost`` of ``links.tunnel_url`` reaches the router from a browser on this machine
    (or through an SSH tunnel to the same port).
    """
    return tunnel_url(backend, f"localhost:{port}")[:-1] + web_path(backend.project_path, session_id)


def marker(record: TaskRecord) -> str:
    """The heading's words that say an outcome of this task was written already."""
    return f"OpenCodeRouter outcome (task {record.id})"


def _when(timestamp: float | None) -> str:
    return "unknown" if timestamp is None else rfc3339(timestamp)


def duration_text(record: TaskRecord) -> str | None:
    """``5.3 s``, ``12 min 4 s``; None when the task never started."""
    if record.started is None or record.finished is None:
        return None
    seconds = max(0.0, record.finished - record.started)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def outcome_block(record: TaskRecord, max_text: int | None = None) -> str:
    """The Markdown appended to the task: status, session, link, duration, then the answer or the error."""
    lines = ["", "", "---", "", f"## {marker(record)}: {record.state}", ""]
    lines.append(f"- status: {record.status or record.state}")
    if record.slug or record.directory:
        lines.append(f"- project: {record.slug or '?'} ({record.directory or '?'})")
    if record.session_id:
        lines.append(f"- session: {record.session_id}")
    if record.link:
        lines.append(f"- open: {record.link}")
    duration = duration_text(record)
    if duration:
        lines.append(f"- duration: {duration}")
    lines.append(f"- finished: {_when(record.finished)}")
    if record.error:
        lines += ["", "### Error", "", record.error]
    if record.text:
        text = record.text
        if max_text is not None and len(text) > max_text:
            text = text[:max_text] + f"\n\n[… cut; the whole answer is at /api/tasks/{record.id}]"
        lines += ["", "### Answer", "", text]
    return "\n".join(lines) + "\n"
