"""How command endings are reported (B22) and how run() arguments become an argv."""

import signal

from localsbx.guest.ssh import ExecResult, agent_command
from localsbx.sandbox import CommandExitReason, CommandResult, shell_argv


def test_signal_reporting_conventions():
    killed = ExecResult(None, int(signal.SIGKILL), b"", b"")
    assert killed.shell_code == 137
    assert "SIGKILL" in killed.describe() and "out of memory" in killed.describe()
    r = CommandResult.from_exec(killed)
    assert (r.exit_code, r.signal, r.reason) == (-9, 9, CommandExitReason.SIGNALED)
    term = ExecResult(None, int(signal.SIGTERM), b"", b"")
    assert term.shell_code == 143 and CommandResult.from_exec(term).exit_code == -15
    plain = ExecResult(3, None, b"o\xff", b"e")
    r = CommandResult.from_exec(plain)
    assert (r.exit_code, r.stdout, r.stdout_bytes, r.reason) == (3, "o\ufffd", b"o\xff",
                                                                CommandExitReason.EXITED)
    timed = ExecResult(None, 9, b"partial", b"", timed_out=True)
    r = CommandResult.from_exec(timed)
    assert r.timed_out and r.exit_code == -9 and r.stdout == "partial"


def test_run_argument_forms():
    assert shell_argv("echo $HOME | wc", None) == ["/bin/sh", "-c", "echo $HOME | wc"]
    assert shell_argv("echo", ["$HOME"]) == ["echo", "$HOME"]
    assert shell_argv("ls", []) == ["ls"]
    assert shell_argv(["ls", "-l"], None) == ["ls", "-l"]


def test_agent_command_quotes_for_any_posix_shell():
    cmd = agent_command("exec", "--env", "A=it's $HOME", "--", "sh", "-c", "echo `x`")
    assert cmd == ("exec /usr/lib/localsbx/agent exec --env 'A=it'\"'\"'s $HOME' -- sh -c "
                   "'echo `x`'")
