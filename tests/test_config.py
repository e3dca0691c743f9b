"""Option parsing: defaults, durations, booleans, --listen, and every bad value."""

from __future__ import annotations

import getpass
import os
import sys

import pytest

from opencoderouter.config import Options, parse_bool, parse_duration


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def error_of(*argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    message = str(raised.value.code)
    assert message.startswith("opencoderouter: ") and "\n" not in message
    return message


def test_defaults_match_the_spec():
    options = parse()
    assert options["port"] == 8080
    assert options["hostname"] == "0.0.0.0"
    assert options["username"] == getpass.getuser()
    assert (options["scan-start"], options["scan-end"]) == (30000, 31000)
    assert options["scan-interval"] == 5.0
    assert options["scan-concurrency"] == 20
    assert options["probe-timeout"] == pytest.approx(0.8)
    assert options["stale-after"] == 30.0
    assert options["mdns"] is True
    assert options["listen"] == "tcp:8080:interface=0.0.0.0"
    assert options["projects"] == []


@pytest.mark.parametrize(
    "text, seconds",
    [("800ms", 0.8), ("5s", 5), ("1m30s", 90), ("1h", 3600), ("2.5", 2.5), ("1.5s", 1.5), ("300us", 0.0003), ("7", 7)],
)
def test_durations_take_go_syntax_and_plain_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "s", "1m30", "ms5", "5 s", "--1s", "1s2"])
def test_unparsable_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, value", [("true", True), ("FALSE", False), ("yes", True), ("no", False), ("1", True), ("0", False)]
)
def test_booleans(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("argv", [["--mdns=false"], ["--mdns", "false"], ["--mdns=no"], ["--mdns", "0"]])
def test_mdns_can_be_turned_off_every_way(argv):
    assert parse(*argv)["mdns"] is False


def test_flags_are_typed():
    options = parse(
        "--port", "31000", "--hostname", "127.0.0.1", "--scan-interval", "1m30s",
        "--probe-timeout", "250ms", "--stale-after", "2", "--scan-concurrency", "3", "--username", "alice",
    )
    assert options["port"] == 31000 and options["scan-interval"] == 90 and options["probe-timeout"] == 0.25
    assert options["stale-after"] == 2 and options["scan-concurrency"] == 3 and options["username"] == "alice"
    assert options["listen"] == "tcp:31000:interface=127.0.0.1"


@pytest.mark.parametrize(
    "description",
    ["tcp:31000:interface=127.0.0.1", "unix:/run/ocr.sock", "systemd:domain=INET:index=0",
     "tcp6:8080:interface=\\:\\:1"],
)
def test_listen_takes_endpoint_strings(description):
    assert parse("--listen", description)["listen"] == description


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--port", "70000"], ["--port", "70000", "0-65535"]),
        (["--port", "-1"], ["--port", "-1"]),
        (["--port", "http"], ["--port", "'http'"]),
        (["--scan-start", "31000", "--scan-end", "30000"], ["--scan-start", "--scan-end"]),
        (["--scan-interval", "0s"], ["--scan-interval", "longer than zero"]),
        (["--probe-timeout", "-5"], ["--probe-timeout"]),
        (["--stale-after", "soon"], ["--stale-after", "'soon'"]),
        (["--scan-concurrency", "0"], ["--scan-concurrency", "at least 1"]),
        (["--scan-concurrency", "many"], ["--scan-concurrency"]),
        (["--mdns", "maybe"], ["--mdns", "'maybe'"]),
        (["--username", "a b"], ["--username"]),
        (["--listen", "bogus:1"], ["--listen", "bogus:1"]),
        (["--no-such-flag"], ["no-such-flag"]),
    ],
)
def test_bad_values_give_one_line_naming_the_flag(argv, words):
    message = error_of(*argv)
    for word in words:
        assert word in message


def test_project_directories_must_exist(tmp_path):
    message = error_of(str(tmp_path / "missing"))
    assert "missing" in message and "does not exist" in message


def test_project_directories_must_be_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in error_of(str(tmp_path / "file"))


def test_a_flag_after_a_directory_is_refused_not_taken_as_a_directory(tmp_path):
    message = error_of(str(tmp_path), "--port", "1")
    assert "--port" in message and "before" in message


def test_project_directories_are_resolved(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    launcher = ("--opencode-bin", sys.executable)  # directories need an executable to launch
    assert parse(*launcher, "link", "./real/")["projects"] == [str(real), str(real)]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse(*launcher, "~/real")["projects"] == [os.path.realpath(real)]


def test_one_directory_check_for_the_router_the_api_and_oc(tmp_path, monkeypatch):
    from opencoderouter.config import ProjectDirectoryError, project_directory

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert project_directory("link") == project_directory("./real/") == str(real)
    for argument, message in (
        ("missing", "project directory missing does not exist"),
        ("notes.txt", "project directory notes.txt is not a directory"),
        ("", "'' is not a directory path"),
        ("a\x00b", "'a\\x00b' is not a directory path"),
    ):
        with pytest.raises(ProjectDirectoryError) as raised:
            project_directory(argument)
        assert str(raised.value) == message
