"""Logging: a level threshold for the router's own messages and a JSON-lines observer for ``twistd --logger``.

twistd writes every event it is given, debug included, so the router's chatty modules log through
``router_observer``, which drops events below ``OPENCODEROUTER_LOG_LEVEL`` (default ``info``).

    twistd -n --logger=opencoderouter.logs.json_observer opencoderouter ...

writes one JSON object per line (to stdout, or to ``$OPENCODEROUTER_LOG_FILE``), with the
structured fields (``event``, ``slug``, ``port``, ...) as top-level keys.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

LEVEL_VARIABLE = "OPENCODEROUTER_LOG_LEVEL"
FILE_VARIABLE = "OPENCODEROUTER_LOG_FILE"


def level_from_environment(environ: dict[str, str] | None = None) -> LogLevel:
    """The threshold named by ``OPENCODEROUTER_LOG_LEVEL`` (debug, info, warn, error, critical)."""
    name = (os.environ if environ is None else environ).get(LEVEL_VARIABLE, "info").strip().lower()
    try:
        return LogLevel.levelWithName("warn" if name == "warning" else name)
    except Exception:
        sys.stderr.write(f"opencoderouter: {LEVEL_VARIABLE}={name!r} is not a log level; using info\n")
        return LogLevel.info


#: The threshold for the router's own loggers; tests and operators may change it at run time.
router_level = LogLevelFilterPredicate(defaultLogLevel=level_from_environment())
#: Give this to ``Logger(observer=...)`` in modules that log per probe or per request at debug level.
router_observer = FilteringLogObserver(globalLogPublisher, [router_level])

# Keys every event carries that the JSON line renders its own way (or leaves out as noise).
_INTERNAL = {"log_logger", "log_source", "log_format", "log_flattened", "log_io", "log_trace", "log_legacy"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as a flat JSON object: time, level, namespace, message, then its own fields."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in record:
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON line and flushes, so ``tail -f | jq`` sees it at once."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        """Write one event."""
        try:
            line = event_as_json(event)
        except Exception as error:  # a log line must never take the router down
            line = json.dumps({"level": "error", "message": f"could not encode a log event: {error!r}"})
        self.out.write(line + "\n")
        self.out.flush()


def json_observer() -> ILogObserver:
    """The ``twistd --logger`` factory: JSON lines at ``OPENCODEROUTER_LOG_LEVEL`` and above."""
    path = os.environ.get(FILE_VARIABLE)
    out: IO[str] = open(path, "a", encoding="utf-8") if path else sys.stdout
    return FilteringLogObserver(JSONLinesObserver(out), [LogLevelFilterPredicate(level_from_environment())])
