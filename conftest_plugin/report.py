"""The failure-report section for a sandbox: its last commands and, if its VM died, the tail
of the guest serial log. Plain text, so it travels in ``report.sections`` (and through
pytest-xdist) and shows under the failure like captured output does."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

#: Commands shown per sandbox (the sandbox keeps the last 20).
MAX_COMMANDS = 10
#: Lines of each output tail shown per command.
TAIL_LINES = 12
#: Lines of the serial log shown when the VM died.
SERIAL_LINES = 40


def _argv_text(argv: list[str]) -> str:
    # `/bin/sh -c 'cmd'` is how run("cmd") runs; show the command line the user wrote
    if len(argv) == 3 and argv[:2] == ["/bin/sh", "-c"]:
        text = argv[2]
    else:
        text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _outcome(entry) -> str:
    if entry.reason == "timed_out":
        return "timed out (process tree killed)"
    if entry.reason == "signaled" and entry.exit_code is not None and entry.exit_code > 128:
        num = entry.exit_code - 128
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = f"signal {num}"
        return f"killed by {name} (exit {entry.exit_code})"
    return f"exit {entry.exit_code}"


def _tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    rows = text.rstrip("\n").splitlines()
    cut = rows[-lines:]
    head = [f"... ({len(rows) - lines} earlier lines)"] if len(rows) > lines else []
    return head + cut


def serial_tail(path: Path, lines: int = SERIAL_LINES) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return f"(serial log {path} is gone)"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def format_sandbox(sandbox_id: str, image: str, history, *, alive: bool, serial_log: Path,
                   kept: bool = False) -> str:
    """The text of one sandbox's report section.

    :param history: the sandbox's ``HistoryEntry`` objects, oldest first.
    :param alive: whether its QEMU still runs; when not, the serial log tail is added.
    :param kept: the sandbox is kept running (``--sandbox-keep``): say how to reach it.
    """
    out = [f"sandbox {sandbox_id} (image {image}): "
           + ("running" if alive else "its VM is gone (QEMU exited)")]
    entries = list(history)
    if not entries:
        out.append("no commands were run in it")
    else:
        shown = entries[-MAX_COMMANDS:]
        skipped = len(entries) - len(shown)
        out.append(f"last {len(shown)} command(s), oldest first"
                   + (f" ({skipped} earlier not shown)" if skipped else "") + ":")
        for e in shown:
            out.append(f"  $ {_argv_text(e.argv)}")
            out.append(f"    -> {_outcome(e)} in {e.seconds:.2f} s")
            for label, text in (("stdout", e.stdout_tail), ("stderr", e.stderr_tail)):
                if text:
                    out.append(f"    {label}:")
                    out.extend(f"      | {ln}" for ln in _tail(text))
    if not alive:
        out.append(f"serial log tail ({serial_log}):")
        out.extend(f"  | {ln}" for ln in serial_tail(serial_log).splitlines())
    if kept:
        out.append(f"kept running: localsbx exec -it {sandbox_id} -- sh   "
                   f"(stop it: localsbx terminate {sandbox_id})")
    return "\n".join(out)
