"""The ``localsbx`` console entry point, with a fast path for ``localsbx exec``.

``localsbx exec ID -- CMD`` on a running sandbox is the command people run in loops, so it
skips the full CLI (typer, rich, asyncssh and asyncio imports cost about a second under
load): it reads the record, connects to the sandbox's supervisor with a blocking unix
socket and streams the output (the same frames as :mod:`localsbx.control`). Anything
else, or anything unusual (a name instead of an id, ``-t``, ``--help``, a sandbox without a
live supervisor), goes to :func:`localsbx.cli.main`, which does the same through the
library.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys

_ID = re.compile(r"^[a-z0-9]{12}$")


def main() -> None:
    """Console entry point."""
    args = sys.argv[1:]
    if args[:1] == ["exec"]:
        rc = _fast_exec(args[1:])
        if rc is not None:
            sys.exit(rc)
    from localsbx.cli import main as cli_main

    cli_main()


def _parse(args: list[str]) -> dict | None:
    """``[-e K=V]... [-w DIR] [--timeout S] [-i] ID [--] CMD...``, or ``None`` to fall back."""
    opts: dict = {"env": {}, "cwd": None, "timeout": None, "stdin": False, "user": None}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        if a in ("-e", "--env", "-w", "--workdir", "--timeout", "-u", "--user") \
                and i + 1 < len(args):
            v = args[i + 1]
            if a in ("-e", "--env"):
                k, sep, val = v.partition("=")
                if not sep or not k:
                    return None
                opts["env"][k] = val
            elif a in ("-w", "--workdir"):
                opts["cwd"] = v
            elif a in ("-u", "--user"):
                opts["user"] = v
            else:
                try:
                    opts["timeout"] = float(v)
                except ValueError:
                    return None
                if not 0 < opts["timeout"] < float("inf"):
                    return None
            i += 2
        elif a in ("-i", "--interactive"):
            opts["stdin"] = True
            i += 1
        else:
            return None  # -t, --help, or something the full CLI should explain
    if i >= len(args) or not _ID.match(args[i]):
        return None
    opts["id"] = args[i]
    cmd = args[i + 1:]
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        return None
    opts["argv"] = cmd
    return opts


def _data_dir() -> str:
    env = os.environ.get("LOCALSBX_HOME")
    if env:
        return os.path.realpath(os.path.expanduser(env))
    import platformdirs

    return os.path.realpath(platformdirs.user_data_dir("localsbx"))


def _alive(pid, start) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, TypeError):
        return False
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def _start_stdin_pump(s: socket.socket) -> None:
    """Stream our stdin to the supervisor as stdin frames while the output is read (the
    command starts at once; the socket's back-pressure bounds memory). A daemon thread: the
    command may end before its input does (``yes | ... head -1``)."""
    import threading

    def pump() -> None:
        try:
            while True:
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    s.sendall(b'{"stream":"stdin","eof":true}\n')
                    return
                s.sendall(b'{"stream":"stdin","size":%d}\n' % len(chunk) + chunk)
        except OSError:  # the supervisor has answered and closed, or stdin is unreadable
            return

    threading.Thread(target=pump, name="localsbx-stdin", daemon=True).start()


def _fast_exec(args: list[str]) -> int | None:
    opts = _parse(args)
    if opts is None:
        return None
    try:
        with open(os.path.join(_data_dir(), "sandboxes", opts["id"], "sandbox.json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if (rec.get("state") != "running" or not rec.get("control_socket")
            or not _alive(rec.get("supervisor_pid"), rec.get("supervisor_start"))):
        return None
    header = {"op": "exec", "argv": opts["argv"], "env": opts["env"], "cwd": opts["cwd"],
              "user": opts["user"], "stdin": "stream" if opts["stdin"] else False,
              "timeout": opts["timeout"]}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(rec["control_socket"])
    except OSError:
        s.close()
        return None
    try:
        s.sendall(json.dumps(header).encode() + b"\n")
        if opts["stdin"]:
            _start_stdin_pump(s)
        f = s.makefile("rb", buffering=1 << 16)
        out, err = sys.stdout.buffer, sys.stderr.buffer
        while True:
            line = f.readline()
            if not line:
                print("localsbx: the sandbox supervisor closed the connection (the sandbox "
                      "may have stopped)", file=sys.stderr)
                return 1
            frame = json.loads(line)
            if "stream" in frame:
                data = f.read(int(frame.get("size") or 0))
                stream = out if frame["stream"] == "stdout" else err
                stream.write(data)
                stream.flush()
                continue
            if not frame.get("ok"):
                e = frame.get("error") or {}
                print(f"error: {e.get('message')}", file=sys.stderr)
                if e.get("hint"):
                    print(f"hint: {e['hint']}", file=sys.stderr)
                return 1
            res = frame["result"]
            if res.get("timed_out"):
                print(f"localsbx: command timed out after {opts['timeout']} s; process tree "
                      "killed", file=sys.stderr)
            if res.get("signal") is not None:
                return 128 + int(res["signal"])
            return int(res["exit_status"]) if res.get("exit_status") is not None else 255
    except KeyboardInterrupt:
        return 130  # closing the socket makes the supervisor kill the command's tree
    except BrokenPipeError:
        return 141
    finally:
        s.close()
