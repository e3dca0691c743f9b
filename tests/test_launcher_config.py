"""The launcher's flags: --opencode-bin, --startup-timeout, --stop-timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from opencoderouter.config import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_launcher_flags_default_to_30s_and_5s() -> None:
    options = parse()
    assert (options["startup-timeout"], options["stop-timeout"]) == (30.0, 5.0)


def test_launcher_durations_take_go_syntax() -> None:
    options = parse("--startup-timeout", "1m30s", "--stop-timeout", "250ms")
    assert (options["startup-timeout"], options["stop-timeout"]) == (90.0, 0.25)


@pytest.mark.parametrize("flag", ["--startup-timeout", "--stop-timeout"])
def test_bad_launcher_durations_name_the_flag(flag: str) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(flag, "soon")
    assert str(raised.value).startswith(f"opencoderouter: {flag}: 'soon' is not a duration")


def test_opencode_bin_is_resolved_to_an_absolute_path(tmp_path: Path) -> None:
    binary = tmp_path / "opencode"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "proj").mkdir()
    assert parse("--opencode-bin", str(binary), str(tmp_path / "proj"))["opencode-bin"] == str(binary)


def test_missing_opencode_is_an_error_only_when_directories_are_given(tmp_path: Path) -> None:
    assert parse("--opencode-bin", str(tmp_path / "nope"))["opencode-bin"] is None
    (tmp_path / "proj").mkdir()
    (tmp_path / "plain").write_text("not executable")
    for missing in (tmp_path / "nope", tmp_path / "plain", tmp_path / "proj"):
        with pytest.raises(SystemExit) as raised:
            parse("--opencode-bin", str(missing), str(tmp_path / "proj"))
        assert str(raised.value) == (
            f"opencoderouter: --opencode-bin: {missing} is not an executable file or a command on PATH; "
            "install opencode (npm install -g opencode-ai) or pass --opencode-bin /path/to/opencode"
        )
