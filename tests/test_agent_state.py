"""The agent state model: OpenCode's events and snapshots in, sessions and summaries out (no I/O)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from opencoderouter.agent_sessions import MAX_PENDING, SessionStatus, web_path
from opencoderouter.agent_state import AgentState, BackendState, Change, Snapshot
from opencoderouter.sse import SSEReader, StreamError

#: Every ``/global/event`` frame of a recorded session with the real OpenCode 1.18.33 (a fake model;
#: permissions, questions, a todo list, errors, an abort, a deletion), minus sync and plugin noise,
#: re-encoded compactly as the server sends them.
REAL_EVENTS = Path(__file__).parent / "data" / "opencode-1.18.33-global-events.jsonl.gz"
PROJECT = "/tmp/ocfacts/a/Proj-One"


def real_frames() -> list[dict[str, Any]]:
    with gzip.open(REAL_EVENTS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def event(kind: str, **properties: Any) -> dict[str, Any]:
    return {"type": kind, "properties": properties}


def busy(state: AgentState, session: str = "ses_a", now: float = 100.0) -> None:
    state.apply(event("session.status", sessionID=session, status={"type": "busy"}), PROJECT, now)


def known(project: str = PROJECT) -> AgentState:
    state = AgentState(project)
    state.load(Snapshot(), 0.0)
    return state


# -- the real server's events ---------------------------------------------------------------------
def test_real_event_capture_keeps_every_invariant_of_the_model():
    state = known()
    seen = {"permission.asked": 0, "question.asked": 0, "session.error": 0, "todo.updated": 0, "session.deleted": 0}
    for number, frame in enumerate(real_frames()):
        payload, props = frame["payload"], frame["payload"]["properties"]
        kind = payload["type"]
        state.apply(payload, frame.get("directory"), float(number))
        session = state.sessions.get(props.get("sessionID", ""))
        if kind in seen:
            seen[kind] += 1
        if kind == "permission.asked":
            assert props["id"] in session.permissions
            assert session.permissions[props["id"]].asking() == f"bash: {props['metadata']['command']}"
            assert state.summary().state is BackendState.NEEDS_YOU
        elif kind in ("permission.replied", "question.replied", "question.rejected"):
            assert all(props["requestID"] not in s.permissions and props["requestID"] not in s.questions
                       for s in state.sessions.values())
        elif kind == "question.asked":
            assert session.questions[props["id"]].asking() == "question: Which colour do you prefer?"
            assert session.questions[props["id"]].items[0].options == ("Red", "Blue")
        elif kind == "session.error":
            if props["error"]["name"] == "MessageAbortedError":
                assert session.status is SessionStatus.IDLE and session.error is None
            else:
                assert session.status is SessionStatus.ERROR
                assert session.error == ("APIError", props["error"]["data"]["message"])
        elif kind == "session.status" and props["status"]["type"] == "busy":
            assert session.status is SessionStatus.WORKING and session.error is None
        elif kind == "session.status" and props["status"]["type"] == "retry":
            assert session.status is SessionStatus.RETRYING and session.retry[0] == props["status"]["attempt"]
        elif kind in ("session.idle",) or (kind == "session.status" and props["status"]["type"] == "idle"):
            assert session.status in (SessionStatus.IDLE, SessionStatus.ERROR)
            assert session.needs_you == 0, "a turn that ended leaves no request pending"
        elif kind == "todo.updated":
            assert session.todo == (0, 2)
        elif kind == "session.deleted":
            assert props["sessionID"] not in state.sessions
        elif kind in ("session.created", "session.updated") and session is not None:
            assert session.title == props["info"]["title"][:200]
            assert session.directory == props["info"]["directory"]
    assert all(count > 0 for count in seen.values()), seen
    assert len(state.sessions) <= state.max_sessions
    assert json.dumps([s.to_json() for s in state.ordered()])  # every view serialises


def test_real_frames_go_through_the_sse_reader_in_any_pieces():
    frames = real_frames()[:200]
    stream = b"".join(b"data: " + json.dumps(f, separators=(",", ":")).encode() + b"\n\n" for f in frames)
    for piece in (1, 7, 333, len(stream)):
        got: list[bytes] = []
        reader = SSEReader(got.append, max_event_bytes=1 << 20)
        for offset in range(0, len(stream), piece):
            reader.feed(stream[offset:offset + piece])
        assert [json.loads(g) for g in got] == frames


# -- sessions ---------------------------------------------------------------------------------------
def test_busy_then_idle_is_working_then_idle_and_repeats_are_no_news():
    state = known()
    busy(state)
    assert state.sessions["ses_a"].status is SessionStatus.WORKING
    assert state.apply(event("session.status", sessionID="ses_a", status={"type": "busy"}), PROJECT, 101) \
        is Change.ACTIVITY
    assert state.apply(event("session.idle", sessionID="ses_a"), PROJECT, 102) is Change.STATE
    assert state.apply(event("session.idle", sessionID="ses_a"), PROJECT, 103) is Change.ACTIVITY
    assert state.summary().state is BackendState.IDLE


def test_an_error_stays_shown_through_the_idles_that_follow_until_the_next_turn():
    state = known()
    busy(state)
    state.apply(event("session.error", sessionID="ses_a", error={"name": "APIError", "data": {
        "message": "fake model refuses this request", "statusCode": 400}}), PROJECT, 101)
    for _ in range(2):
        state.apply(event("session.status", sessionID="ses_a", status={"type": "idle"}), PROJECT, 102)
        state.apply(event("session.idle", sessionID="ses_a"), PROJECT, 102)
    session = state.sessions["ses_a"]
    assert session.status is SessionStatus.ERROR and session.error == ("APIError", "fake model refuses this request")
    assert state.summary().state is BackendState.ERROR and state.summary().label() == "error"
    assert session.to_json()["last_error"] == {"name": "APIError", "message": "fake model refuses this request"}
    busy(state, now=200)
    assert session.status is SessionStatus.WORKING and session.error is None


def test_an_abort_is_not_an_error():
    state = known()
    busy(state)
    state.apply(event("session.error", sessionID="ses_a", error={"name": "MessageAbortedError",
                                                                 "data": {"message": "Aborted"}}), PROJECT, 101)
    assert state.sessions["ses_a"].status is SessionStatus.IDLE and state.summary().state is BackendState.IDLE


def test_retry_shows_attempt_message_and_next_time():
    state = known()
    state.apply(event("session.status", sessionID="ses_a", status={
        "type": "retry", "attempt": 2, "message": "fake overloaded", "next": 1796168016336}), PROJECT, 100)
    session = state.sessions["ses_a"]
    assert session.status is SessionStatus.RETRYING
    assert session.to_json()["retry"] == {"attempt": 2, "message": "fake overloaded", "next": "2026-12-01T23:33:36Z"}
    assert state.summary().state is BackendState.WORKING and state.summary().working == 1


def test_permission_and_question_need_you_until_answered_and_ending_the_turn_clears_them():
    state = known()
    busy(state)
    state.apply(event("permission.asked", id="per_1", sessionID="ses_a", permission="bash",
                      patterns=["rm -rf build/"], metadata={"command": "rm -rf build/"}, always=["rm *"]), PROJECT, 101)
    state.apply(event("question.asked", id="que_1", sessionID="ses_a", questions=[
        {"question": "Which colour?", "header": "Colour", "options": [{"label": "Red"}, {"label": "Blue"}]}]),
        PROJECT, 102)
    summary = state.summary()
    assert (summary.state, summary.needs_you, summary.label()) == \
        (BackendState.NEEDS_YOU, 2, "needs you (2)")
    view = state.sessions["ses_a"].to_json()
    assert view["permissions"][0]["asking"] == "bash: rm -rf build/" and view["permissions"][0]["always"] == ["rm *"]
    assert view["questions"][0]["questions"][0]["options"] == ["Red", "Blue"]
    assert state.apply(event("permission.replied", sessionID="ses_a", requestID="per_1", reply="once"),
                       PROJECT, 103) is Change.STATE
    assert state.summary().needs_you == 1
    # The turn ends (an abort) with the question unanswered: it is stale, not waiting.
    state.apply(event("session.idle", sessionID="ses_a"), PROJECT, 104)
    assert state.summary().needs_you == 0 and state.summary().state is BackendState.IDLE


def test_todo_progress_counts_completed_of_the_live_items():
    state = known()
    busy(state)
    state.apply(event("todo.updated", sessionID="ses_a", todos=[
        {"content": "a", "status": "completed"}, {"content": "b", "status": "in_progress"},
        {"content": "c", "status": "cancelled"}]), PROJECT, 101)
    assert state.sessions["ses_a"].to_json()["todo"] == {"done": 1, "total": 2}


def test_activity_moves_last_activity_without_being_news_and_unknown_sessions_are_not_created():
    state = known()
    busy(state, now=100)
    change = state.apply(event("message.part.delta", sessionID="ses_a", messageID="m", partID="p", field="text",
                               delta="a secret the router must not keep"), PROJECT, 150)
    assert change is Change.ACTIVITY and state.sessions["ses_a"].last_activity == 150
    assert "secret" not in json.dumps(state.sessions["ses_a"].to_json())
    assert state.apply(event("message.part.delta", sessionID="ses_zzz", delta="x"), PROJECT, 151) is Change.NONE
    assert "ses_zzz" not in state.sessions


def test_session_info_gives_title_directory_and_a_web_ui_path():
    state = known()
    state.apply(event("session.created", sessionID="ses_dcc0b5db2ffeq1Y1Lv80Bl7Oj6", info={
        "id": "ses_dcc0b5db2ffeq1Y1Lv80Bl7Oj6", "directory": PROJECT, "title": "Fix the <b>login</b>",
        "time": {"created": 1796168000077, "updated": 1796168000077}}), PROJECT, 100)
    view = state.sessions["ses_dcc0b5db2ffeq1Y1Lv80Bl7Oj6"].to_json()
    assert view["title"] == "Fix the <b>login</b>" and view["directory"] == PROJECT
    # The exact form the real web UI uses (verified in Chromium): base64url without padding.
    assert view["web_path"] == "/L3RtcC9vY2ZhY3RzL2EvUHJvai1PbmU/session/ses_dcc0b5db2ffeq1Y1Lv80Bl7Oj6"
    assert web_path("/tmp/ocfacts/a/Proj-One", "ses_x") == "/L3RtcC9vY2ZhY3RzL2EvUHJvai1PbmU/session/ses_x"


def test_a_deleted_session_is_gone():
    state = known()
    busy(state)
    state.apply(event("session.deleted", sessionID="ses_a", info={"id": "ses_a"}), PROJECT, 101)
    assert state.sessions == {}


# -- hostile values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["../../etc", "ses a", "", "x" * 200, 42, None, ["ses_a"]])
def test_ids_that_are_not_ids_are_ignored(bad_id):
    state = known()
    assert state.apply(event("session.status", sessionID=bad_id, status={"type": "busy"}), PROJECT, 1) is Change.NONE
    assert state.apply(event("permission.asked", id=bad_id, sessionID="ses_a"), PROJECT, 1) is Change.NONE
    assert list(state.sessions) in ([], ["ses_a"])
    assert all(not s.permissions for s in state.sessions.values())


@pytest.mark.parametrize("payload", [
    {}, {"type": 5}, {"type": "session.status"}, {"type": "session.status", "properties": []},
    {"type": "session.status", "properties": {"sessionID": "ses_a", "status": "busy"}},
    {"type": "permission.asked", "properties": {"id": "per_1", "sessionID": "ses_a", "patterns": "nope",
                                                "metadata": [], "always": {"x": 1}}},
    {"type": "question.asked", "properties": {"id": "que_1", "sessionID": "ses_a", "questions": [[1], "x", None]}},
    {"type": "todo.updated", "properties": {"sessionID": "ses_a", "todos": "all of them"}},
    {"type": "session.updated", "properties": {"info": {"id": "ses_a", "title": ["x"], "time": "soon"}}},
    {"type": "session.error", "properties": {"sessionID": "ses_a", "error": "boom"}},
])
def test_malformed_payloads_never_raise(payload):
    state = known()
    state.apply(payload, PROJECT, 1.0)
    state.apply(payload, 12345, 1.0)  # type: ignore[arg-type]
    json.dumps([s.to_json() for s in state.ordered()])
    state.summary().to_json()


def test_strings_are_bounded_and_pending_requests_per_session_are_capped():
    state = known()
    busy(state)
    state.apply(event("session.updated", info={"id": "ses_a", "title": "t" * 10_000}), PROJECT, 1)
    for n in range(50):
        state.apply(event("permission.asked", id=f"per_{n}", sessionID="ses_a", permission="bash" * 100,
                          patterns=["p" * 10_000] * 100, metadata={"command": "c" * 10_000}), PROJECT, 2)
    session = state.sessions["ses_a"]
    assert len(session.title) == 200 and session.needs_you == MAX_PENDING
    permission = next(iter(session.permissions.values()))
    assert len(permission.command) == 300 and len(permission.patterns) == 5 and len(permission.tool) == 80
    assert len(json.dumps(session.to_json())) < 40_000


def test_sessions_are_capped_keeping_the_busy_and_the_recent():
    state = AgentState(PROJECT, max_sessions=5)
    state.load(Snapshot(), 0)
    busy(state, "ses_busy", now=1)
    for n in range(30):
        state.apply(event("session.updated", info={"id": f"ses_{n:02d}", "title": str(n)}), PROJECT, 10 + n)
    assert len(state.sessions) == 5
    assert "ses_busy" in state.sessions and {"ses_29", "ses_28", "ses_27", "ses_26"} <= set(state.sessions)


def test_directories_other_than_the_project_are_remembered_boundedly():
    state = known()
    for n in range(20):
        busy(state, f"ses_{n}", now=n)
        state.apply(event("session.status", sessionID=f"ses_x{n}", status={"type": "busy"}), f"/other/{n}", n)
    assert state.directories == [f"/other/{n}" for n in range(12, 20)]


# -- snapshots -----------------------------------------------------------------------------------------------
def test_a_snapshot_replaces_the_state_and_drops_stale_requests():
    state = AgentState(PROJECT)
    busy(state, "ses_gone")
    snapshot = Snapshot(
        statuses={"ses_busy": {"type": "busy"}},
        permissions=[
            {"id": "per_live", "sessionID": "ses_busy", "permission": "bash", "patterns": ["ls"],
             "metadata": {"command": "ls"}},
            # Kept by the server after an abort: its session is not busy any more.
            {"id": "per_stale", "sessionID": "ses_idle", "permission": "bash", "patterns": ["rm"]},
        ],
        questions=[{"id": "que_stale", "sessionID": "ses_idle", "questions": []}],
        sessions=[{"id": "ses_busy", "title": "Busy one", "directory": PROJECT, "time": {"updated": 1796168000077}},
                  {"id": "ses_idle", "title": "Idle one", "directory": PROJECT, "time": {"updated": 1796168000000}},
                  {"id": "ses_failed", "title": "Failed", "directory": PROJECT, "time": {"updated": 1796167000000}}],
    )
    details = Snapshot(
        last_messages={"ses_failed": {"role": "assistant", "error": {"name": "APIError",
                                                                      "data": {"message": "refused"}}}},
        todos={"ses_busy": [{"status": "completed"}, {"status": "pending"}]},
    )
    assert state.summary().state is BackendState.UNKNOWN and state.reason == "not connected yet"
    state.load(snapshot, 500.0)
    assert state.wanted_last_messages(snapshot, 5) == ["ses_idle", "ses_failed"]
    assert state.enrich(details) is True
    assert set(state.sessions) == {"ses_busy", "ses_idle", "ses_failed"}
    assert state.sessions["ses_busy"].status is SessionStatus.WORKING
    assert list(state.sessions["ses_busy"].permissions) == ["per_live"]
    assert state.sessions["ses_busy"].todo == (1, 2)
    assert state.sessions["ses_idle"].needs_you == 0
    assert state.sessions["ses_failed"].error == ("APIError", "refused")
    summary = state.summary()
    assert (summary.state, summary.needs_you, summary.working, summary.errors, summary.sessions) == \
        (BackendState.NEEDS_YOU, 1, 0, 1, 3)
    assert [s.id for s in state.ordered()] == ["ses_busy", "ses_failed", "ses_idle"]


def test_an_error_seen_before_a_reconnect_stays_until_the_second_look_says_otherwise():
    state = known()
    busy(state)
    state.apply(event("session.error", sessionID="ses_a", error={"name": "APIError", "data": {"message": "x"}}),
                PROJECT, 101)
    listed = Snapshot(sessions=[{"id": "ses_a", "title": "t", "directory": PROJECT}])
    state.load(listed, 200)
    assert state.sessions["ses_a"].status is SessionStatus.ERROR
    assert state.wanted_last_messages(listed, 5) == ["ses_a"]
    # Its last message has no error (a turn ended well while the router was away).
    assert state.enrich(Snapshot(last_messages={"ses_a": {"role": "assistant", "time": {"completed": 1}}})) is True
    assert state.sessions["ses_a"].status is SessionStatus.IDLE and state.sessions["ses_a"].error is None


def test_a_request_asked_before_a_reconnect_keeps_its_asked_time():
    state = known()
    busy(state)
    state.apply(event("permission.asked", id="per_1", sessionID="ses_a", permission="bash"), PROJECT, 100)
    state.mark_unknown("its event stream was cut")
    state.load(Snapshot(statuses={"ses_a": {"type": "busy"}},
                        permissions=[{"id": "per_1", "sessionID": "ses_a", "permission": "bash"}]), 900)
    assert state.sessions["ses_a"].permissions["per_1"].asked_at == 100


def test_unknown_until_loaded_and_after_the_stream_is_lost():
    state = AgentState(PROJECT)
    assert state.summary().to_json() == {"state": "unknown", "label": "unknown", "working": 0, "needs_you": 0,
                                         "errors": 0, "sessions": 0, "reason": "not connected yet"}
    state.load(Snapshot(), 1)
    assert state.summary().state is BackendState.IDLE
    assert state.mark_unknown("its event stream was cut") is True
    assert state.mark_unknown("its event stream was cut") is False
    assert state.summary().reason == "its event stream was cut"


# -- the SSE reader -------------------------------------------------------------------------------------------
def test_sse_reader_handles_crlf_comments_fields_and_multiline_data():
    got: list[bytes] = []
    reader = SSEReader(got.append, max_event_bytes=1000)
    reader.feed(b": comment\r\nevent: x\r\nid: 1\r\nretry: 5\r\ndata: a\r\ndata:b\r\n\r\n\n\ndata: c\n\n")
    assert got == [b"a\nb", b"c"]


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe binary junk\n", b"HTTP/1.1 200 OK\n", b"<html>\n"])
def test_sse_reader_refuses_lines_that_are_not_sse(garbage):
    reader = SSEReader(lambda data: None, max_event_bytes=1000)
    with pytest.raises(StreamError, match="not server-sent events"):
        reader.feed(garbage)


def test_sse_reader_refuses_an_event_over_the_cap_before_holding_it_whole():
    reader = SSEReader(lambda data: None, max_event_bytes=64 * 1024)
    piece = b"x" * 4096
    reader.feed(b"data: ")
    fed = 0
    with pytest.raises(StreamError, match="larger than 65536 bytes"):
        for _ in range(10 * 256):  # 10 MB, if it were all read
            reader.feed(piece)
            fed += len(piece)
    assert fed <= 64 * 1024
    # Also when it comes as many data lines.
    reader = SSEReader(lambda data: None, max_event_bytes=64 * 1024)
    with pytest.raises(StreamError):
        for _ in range(100):
            reader.feed(b"data: " + piece + b"\n")


def test_a_lenient_sse_reader_drops_an_oversized_event_whole_and_goes_on():
    got: list[bytes] = []
    reader = SSEReader(got.append, max_event_bytes=1000, strict=False)
    reader.feed(b"data: ")
    for _ in range(10):  # a line over the cap, never held whole
        reader.feed(b"y" * 500)
        assert reader._partial_size <= 1000
    # The end of the dropped line comes at the start of a read: it is not the event's blank line.
    reader.feed(b"tail")
    reader.feed(b"\ndata: rest of the dropped event\n")
    reader.feed(b"\ndata: next\n\n")
    # An event over the cap in many data lines is dropped too, up to its blank line.
    reader.feed(b"".join(b"data: " + b"z" * 100 + b"\n" for _ in range(20)) + b"\ndata: last\n\n")
    assert got == [b"next", b"last"]


def test_a_lenient_sse_reader_ignores_lines_that_are_not_sse():
    got: list[bytes] = []
    reader = SSEReader(got.append, max_event_bytes=1000, strict=False)
    reader.feed(b"HTTP/1.1 200 OK\n<html>\ndata: a\n\n")
    assert got == [b"a"]
