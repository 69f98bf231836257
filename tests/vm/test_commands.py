"""Commands in the guest: exact exit codes and signals, separate stdout/stderr as bytes,
no PTY, stdin at EOF, timeouts that kill the whole process tree (cases B19, B21, B22, B24,
B25)."""

import hashlib
import signal

import pytest

from localsbx.sandbox import CommandExitReason

pytestmark = pytest.mark.vm


def test_exit_codes_and_stderr_are_exact(shared_sandbox):
    r = shared_sandbox.run("sh -c 'exit 3'")
    assert (r.exit_code, r.reason, r.signal) == (3, CommandExitReason.EXITED, None)
    r = shared_sandbox.run("echo out; echo err 1>&2")  # B25.1
    assert (r.stdout_bytes, r.stderr_bytes) == (b"out\n", b"err\n")
    r = shared_sandbox.run("no-such-command-xyz")
    assert r.exit_code == 127 and "not found" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_signals_are_reported_as_signals(shared_sandbox, sig):  # B22
    r = shared_sandbox.run(f"kill -{sig.name[3:]} $$")
    assert r.reason is CommandExitReason.SIGNALED
    assert (r.signal, r.exit_code) == (int(sig), -int(sig))  # Tensorlake: -N
    res = shared_sandbox.exec(["sh", "-c", f"kill -{sig.name[3:]} $$"])
    assert res.shell_code == 128 + int(sig)  # docker exec / CLI convention: 143, 137, 139


def test_no_pty(shared_sandbox):  # B25.2
    r = shared_sandbox.run('tty; echo "rc=$?"')
    assert r.stdout == "not a tty\nrc=1\n"


def test_stdin_is_at_eof_unless_given(shared_sandbox):  # B19
    r = shared_sandbox.run("cat")
    assert (r.exit_code, r.stdout) == (0, "")
    assert shared_sandbox.run('read -r x; echo "rc=$?"').stdout == "rc=1\n"
    r = shared_sandbox.run("tr a-z A-Z", stdin=b"shout\n")
    assert r.stdout == "SHOUT\n"


def test_invalid_utf8_and_packet_boundaries(shared_sandbox):  # B21
    r = shared_sandbox.run(r"printf 'ok\377\376end\n'")
    assert r.exit_code == 0
    assert r.stdout_bytes == b"ok\xff\xfeend\n"
    assert r.stdout == "ok\ufffd\ufffdend\n"
    assert shared_sandbox.run("echo still-alive").stdout == "still-alive\n"
    r = shared_sandbox.run("head -c 32767 /dev/zero | tr '\\000' a; printf '\\303\\251\\n'")
    assert len(r.stdout_bytes) == 32770 and r.stdout.endswith("é\n") and "\ufffd" not in r.stdout


def test_binary_file_roundtrip(shared_sandbox):  # B21.4
    r = shared_sandbox.run("head -c 1048576 /dev/urandom > /tmp/rand.bin && sha256sum /tmp/rand.bin")
    data = shared_sandbox.read_file("/tmp/rand.bin")
    assert hashlib.sha256(data).hexdigest() == r.stdout.split()[0]
    shared_sandbox.write_file("/tmp/back.bin", data)
    assert shared_sandbox.run("sha256sum /tmp/back.bin").stdout.split()[0] == r.stdout.split()[0]


def test_large_stdout_and_stderr_at_once(shared_sandbox):  # B24
    r = shared_sandbox.run('head -c 10485760 /dev/zero | tr "\\000" a & '
                           'head -c 10485760 /dev/zero | tr "\\000" b 1>&2; wait', timeout=120)
    assert r.exit_code == 0
    assert r.stdout_bytes == b"a" * 10485760
    assert r.stderr_bytes == b"b" * 10485760
    assert shared_sandbox.run("printf abc").stdout_bytes == b"abc"


def test_timeout_kills_the_whole_process_tree(shared_sandbox):
    r = shared_sandbox.run("sleep 1000 & (setsid sleep 1001 &) ; echo started; sleep 1002",
                           timeout=3)
    assert r.timed_out and r.reason is CommandExitReason.TIMED_OUT and r.exit_code == -9
    assert r.stdout == "started\n"
    left = shared_sandbox.run("pgrep -a sleep")
    assert left.exit_code == 1, left.stdout  # even the setsid'ed grandchild is gone


def test_exec_form_has_no_shell(shared_sandbox):
    r = shared_sandbox.run("echo", ["$HOME", "a b"])
    assert r.stdout == "$HOME a b\n"
    r = shared_sandbox.run("printenv", ["HOME"], env={"EXTRA": "1"})
    assert r.stdout == "/root\n"
    assert shared_sandbox.run("printenv EXTRA", env={"EXTRA": "x y"}).stdout == "x y\n"


def test_working_dir_and_user(shared_sandbox):
    assert shared_sandbox.run("pwd", working_dir="/opt").stdout == "/opt\n"
    r = shared_sandbox.run("pwd", working_dir="/nonexistent")
    assert r.exit_code == 126 and "/nonexistent" in r.stderr
    r = shared_sandbox.run("id -u; id -g", user="1234:1234")
    assert r.stdout == "1234\n1234\n"
    r = shared_sandbox.run("id -un", user="nobody")
    assert r.stdout == "nobody\n"


def test_management_ssh_survives_user_ssh_changes(fresh_sandbox):
    sb = fresh_sandbox
    # a user's own sshd config / removing ssh packages must not affect localsbx
    sb.run("rm -rf /etc/ssh /etc/dropbear; (apt-get -y remove openssh-server dropbear >/dev/null 2>&1 || true)")
    assert sb.run("echo still-managed").stdout == "still-managed\n"
    # nothing of ours listens on 22
    assert ":22 " not in sb.run("cat /proc/net/tcp | awk '{print $2}'").stdout
