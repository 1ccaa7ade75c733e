"""
The dry-run checker, C{python -m socks4tx.rules FILE [USERID SOURCE
DESTINATION PORT]}: its output and exit statuses (0 permit or a good file,
1 deny, 2 a file that doesn't parse or a usage error).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from socks4tx.rules import main

ROOT = Path(__file__).parent.parent
RULES = """\
#NO_IDENTD: echo %A
permit ?=I *=alice 10.0.0.0/8 192.0.2.0 255.255.255.0 eq http : echo %u
deny 10.0.0.0/8
permit ::1/128
permit 127.0.0.0 255.0.0.0 ge 1024
permit *=\xe9ric 172.16.0.0/12
"""
BROKEN = """\
permit 0.0.0.0/0
allow 10.0.0.0/8
permit 10.0.0.1 eq 80
permit 10.0.0.0/8 eq nosuchservice
"""


@pytest.fixture
def rules(tmp_path: Path) -> str:
    path = tmp_path / "sockd.conf"
    path.write_text(RULES, encoding="utf-8")
    return str(path)


@pytest.fixture
def broken(tmp_path: Path) -> str:
    path = tmp_path / "broken.conf"
    path.write_text(BROKEN)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_check_a_good_file(capsys: pytest.CaptureFixture[str], rules: str) -> None:
    assert run(capsys, rules) == (0, f"{rules}: OK, 5 rules\n", "")


def test_a_file_without_rules_is_fine_but_said_to_deny_everything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.conf"
    empty.write_text("# nothing yet\n")
    status, out, _ = run(capsys, str(empty))
    assert status == 0
    assert out == (
        f"{empty}: OK, 0 rules\n{empty}: no rules: every session will be denied\n"
    )


def test_an_ipv6_destination_is_named_as_such(
    capsys: pytest.CaptureFixture[str], rules: str
) -> None:
    status, _, err = run(capsys, rules, "alice", "10.0.0.1", "::1", "80")
    assert status == 2
    assert "'::1': SOCKS4 destinations are IPv4 addresses" in err


def test_check_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, str(ROOT / "examples" / "sockd.conf"))
    assert status == 0
    assert "OK" in out


def test_check_a_broken_file(capsys: pytest.CaptureFixture[str], broken: str) -> None:
    status, out, err = run(capsys, broken)
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"{broken}:2: unknown action 'allow' (permit or deny)",
        f"{broken}:3: source address '10.0.0.1' needs a mask (or use CIDR)",
        f"{broken}:4: unknown service 'nosuchservice'",
        f"{broken}: 3 errors",
    ]


def test_a_broken_file_with_a_request(
    capsys: pytest.CaptureFixture[str], broken: str
) -> None:
    status, out, err = run(capsys, broken, "alice", "10.1.1.1", "192.0.2.1", "80")
    assert (status, out) == (2, "")
    assert f"{broken}:2:" in err and f"{broken}:4:" in err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, str(tmp_path / "nope"))
    assert (status, out) == (2, "")
    assert "can't read" in err


def test_permit(capsys: pytest.CaptureFixture[str], rules: str) -> None:
    status, out, err = run(capsys, rules, "alice", "10.1.2.3", "192.0.2.9", "http")
    assert status == 0
    assert out.splitlines() == [
        f"{rules}:2: permit, ident required, destination named explicitly",
        "  permit ?=I *=alice 10.0.0.0/8 192.0.2.0 255.255.255.0 eq http : echo %u",
    ]
    assert err == ""


def test_deny_by_a_rule(capsys: pytest.CaptureFixture[str], rules: str) -> None:
    status, out, _ = run(capsys, rules, "bob", "10.1.2.3", "192.0.2.9", "80")
    assert status == 1
    assert out.splitlines()[0] == f"{rules}:3: deny, ident server default"


def test_default_deny(capsys: pytest.CaptureFixture[str], rules: str) -> None:
    status, out, _ = run(capsys, rules, "alice", "203.0.113.1", "192.0.2.9", "80")
    assert (status, out) == (1, f"{rules}: no rule matches: deny (the default)\n")


@pytest.mark.parametrize(
    ("source", "port", "status"),
    [
        ("::1", "1", 0),
        ("::ffff:127.0.0.1", "1024", 0),
        ("::ffff:127.0.0.1", "1023", 1),
        ("unix", "2000", 0),
        ("unix:/run/socks.sock", "ssh", 1),
    ],
)
def test_sources(
    capsys: pytest.CaptureFixture[str], rules: str, source: str, port: str, status: int
) -> None:
    assert run(capsys, rules, "", source, "198.51.100.1", port)[0] == status


def test_destination_by_name(capsys: pytest.CaptureFixture[str], rules: str) -> None:
    assert run(capsys, rules, "x", "127.0.0.1", "localhost", "8080")[0] == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["a", "b"],
        ["a", "b", "c", "d"],
        ["a", "b", "c", "d", "e", "f"],
        ["RULES", "alice", "not-an-ip", "192.0.2.1", "80"],
        ["RULES", "alice", "10.0.0.1", "::1", "80"],
        ["RULES", "alice", "10.0.0.1", "192.0.2.1", "65536"],
        ["RULES", "alice", "10.0.0.1", "192.0.2.1", "nosuchservice"],
        ["RULES", "alice", "10.0.0.1", "192.0.2.1", "-1"],
    ],
)
def test_usage_errors(
    capsys: pytest.CaptureFixture[str], rules: str, argv: list[str]
) -> None:
    status, out, err = run(capsys, *[rules if a == "RULES" else a for a in argv])
    assert (status, out) == (2, "")
    assert "usage: python -m socks4tx.rules FILE" in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert out.startswith("usage:")


def _module(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "socks4tx.rules", *argv],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )


def test_run_as_a_module(rules: str, broken: str) -> None:
    """The real command line, bytes of a non-ASCII USERID included."""
    assert _module(rules).returncode == 0
    result = _module(broken)
    assert result.returncode == 2
    assert f"{broken}:2: unknown action".encode() in result.stderr
    permit = [rules, "\xe9ric", "172.16.0.1", "192.0.2.1", "80"]
    assert _module(*permit).returncode == 0
    assert _module(rules, "eric", "172.16.0.1", "192.0.2.1", "80").returncode == 1
    assert _module().returncode == 2


def test_import_has_no_side_effects() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import socks4tx.rules"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
