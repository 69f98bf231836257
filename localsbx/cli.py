"""The ``localsbx`` command line (typer + rich). Thin: parse, call the API, render.

Errors are :class:`localsbx.errors.LocalsbxError`; they are printed (message + hint) and the
command exits 1 (``exec`` exits with the command's own code, 128+N for signal N). SIGTERM and
SIGHUP are turned into KeyboardInterrupt so every cleanup runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from localsbx import store
from localsbx.definition.loader import load_definition
from localsbx.errors import ConfigError, LocalsbxError

app = typer.Typer(help="Local, offline Tensorlake-style sandboxes on QEMU microVMs.",
                  no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
base_app = typer.Typer(help="Base images (root filesystems + kernels).", no_args_is_help=True)
image_app = typer.Typer(help="Images built from Dockerfiles or the Python DSL.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(image_app, name="image")
snapshot_app = typer.Typer(help="Checkpoints of sandboxes (Tensorlake's snapshots).",
                           no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

ProjectOpt = Annotated[Optional[str], typer.Option(
    "--project", "-p", help="Project (default: $LOCALSBX_PROJECT or 'default').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


#: Step output was already shown live (so an error need not repeat its tail).
_streamed_output = False


class _CliReporter:
    """Build progress on stderr. On a terminal step output streams as it comes; piped, each
    output line is prefixed with its step (``#3 ...``, as ``docker buildx --progress
    plain``), so interleaved logs stay readable. Cached steps say ``CACHED``."""

    def __init__(self, quiet: bool = False, plain: bool | None = None) -> None:
        self.quiet = quiet
        self.plain = not sys.stderr.isatty() if plain is None else plain
        self.step = ""
        self.partial = b""

    def say(self, text: str) -> None:
        import re

        m = re.match(r"\[(\d+)/\d+\] ", text)
        if m:
            self._end_line()
            self.step = m.group(1)
        style = ("yellow" if text.startswith("warning") else
                 "blue" if m and text[m.end():].startswith("CACHED ") else "bold")
        err.print(f"[{style}]{_esc(text)}[/]")

    def output(self, chunk: bytes) -> None:
        global _streamed_output
        if self.quiet:
            return
        _streamed_output = True
        if self.plain and self.step:
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            chunk = b"".join(f"#{self.step} ".encode() + ln + b"\n" for ln in lines)
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()

    def _end_line(self) -> None:
        if self.partial:
            sys.stderr.buffer.write(f"#{self.step} ".encode() + self.partial + b"\n")
            sys.stderr.buffer.flush()
            self.partial = b""

    def close(self, failed: bool = False) -> None:
        self._end_line()


class _LiveReporter:
    """Build progress as a live view on a terminal (``docker buildx`` style): one line per
    step with its mark (``CACHED``, running, done) and time, the last lines of the running
    step's output under it; other status lines print above the view."""

    TAIL = 6

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        from collections import deque

        from rich.live import Live

        self.quiet = quiet
        self.console = console or err
        self.entries: list[list] = []  # [label, mark, started, ended]
        self.tail: deque[str] = deque(maxlen=self.TAIL)
        self.partial = ""
        self.live = Live(self, console=self.console, refresh_per_second=8, transient=False)
        self.live.start()

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        now = time.monotonic()
        lines = []
        for label, mark, t0, t1 in self.entries:
            secs = f"{(t1 or now) - t0:5.1f}s" if mark != "CACHED" else "      "
            style = {"CACHED": "blue", "done": "green", "running": "bold",
                     "failed": "red"}[mark]
            sign = {"CACHED": "CACHED ", "done": "\u2714 ", "running": "\u2026 ",
                    "failed": "\u2718 "}[mark]
            lines.append(Text.assemble((secs + " ", "dim"), (sign, style), label))
        if self.entries and self.entries[-1][1] == "running":
            for ln in [*self.tail, *([self.partial] if self.partial else [])][-self.TAIL:]:
                lines.append(Text("        | " + ln, style="dim"))
        return Group(*lines)

    def _finish(self, mark: str = "done") -> None:
        if self.entries and self.entries[-1][1] == "running":
            self.entries[-1][1:] = [mark, self.entries[-1][2], time.monotonic()]

    def say(self, text: str) -> None:
        import re

        m = re.match(r"(\[\d+/\d+\]) (CACHED )?(.*)", text)
        if m:
            self._finish()
            self.tail.clear()
            self.partial = ""
            self.entries.append([f"{m.group(1)} {m.group(3)}",
                                 "CACHED" if m.group(2) else "running", time.monotonic(), 0.0])
        else:
            if text.startswith("build steps done"):
                self._finish()
            style = "yellow" if text.startswith("warning") else "bold"
            self.console.print(f"[{style}]{_esc(text)}[/]")
        self.live.refresh()

    def output(self, chunk: bytes) -> None:
        if self.quiet:
            return
        *lines, self.partial = (self.partial + chunk.decode(errors="replace")).split("\n")
        self.tail.extend(ln.rstrip("\r") for ln in lines)

    def close(self, failed: bool = False) -> None:
        self._finish("failed" if failed else "done")
        self.live.stop()


def _pairs(option: str, values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` option values as a dict.

    :raises ConfigError: a value without ``=``.
    """
    out = {}
    for item in values:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def _esc(text: str) -> str:
    return text.replace("[", r"\[")


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Log what localsbx does (QEMU argv, QMP, SSH) to stderr; sandbox "
        "supervisors log at debug level to their supervisor.log.")] = False) -> None:
    from localsbx._log import env_level

    if debug or env_level():
        import logging

        from rich.logging import RichHandler

        level = "DEBUG" if debug else env_level()
        os.environ["LOCALSBX_LOG"] = level  # inherited by the supervisors this starts
        logging.basicConfig(level=level, format="%(name)s: %(message)s",
                            handlers=[RichHandler(console=err, show_time=False, show_path=False)])
        logging.getLogger("asyncssh").setLevel("WARNING" if level != "DEBUG" else "INFO")


# ----------------------------------------------------------------------------- base

@base_app.command("build")
def base_build(name: Annotated[str, typer.Argument(help="Base name, e.g. debian-minimal.")],
               force: Annotated[bool, typer.Option("--force", help="Rebuild even if built.")] = False,
               mirror: Annotated[Optional[str], typer.Option(
                   "--mirror", help="Archive URL (default: LOCALSBX_MIRROR, the host's apt "
                                    "mirror, the recipe's).")] = None):
    """Build a base image (mmdebstrap rootfs, cloud kernel, initramfs)."""
    from localsbx.base import build_base

    info = build_base(name, force=force, mirror=mirror, progress=lambda t: err.print(_esc(t)))
    err.print(f"[green]base {info.name} ready[/] at {info.path}")


@base_app.command("import")
def base_import(
    name: Annotated[str, typer.Argument(help="Name of the new base.")],
    source: Annotated[Path, typer.Argument(
        help="A rootfs tarball (docker export, a cloud root tarball; .tar, .gz, .xz, .zst) "
             "or an archive from `localsbx base export`.")],
    kit: Annotated[str, typer.Option(
        "--kit", help="Built base whose kernel and initramfs (boot kit) a rootfs boots with.")]
        = "debian-minimal",
    size_gib: Annotated[Optional[int], typer.Option(
        "--size-gib", help="Filesystem size for a rootfs (GiB; default 8 or what it needs).")]
        = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a base of that name.")] = False,
):
    """Make a base from any Linux root filesystem, or from an exported base."""
    from localsbx.rootfs import import_base

    info = import_base(name, source, kit=kit, size_gib=size_gib, force=force,
                       progress=lambda t: err.print(_esc(t)))
    err.print(f"[green]base {info.name} ready[/] at {info.path}")


@base_app.command("export")
def base_export(name: Annotated[str, typer.Argument(help="A built base.")],
                dest: Annotated[Path, typer.Argument(
                    help="Archive to write (.tar; .gz, .xz, .zst compress).")]):
    """Write a base to a portable archive that `base import` turns back into the same base."""
    from localsbx.rootfs import export_base

    path = export_base(name, dest, progress=lambda t: err.print(_esc(t)))
    err.print(f"[green]base {name} exported[/] to {path} ({_size(path.stat().st_size)})")


@base_app.command("ls")
def base_ls(as_json: JsonOpt = False):
    """List base images and whether they are built."""
    from localsbx.base import list_bases

    bases = list_bases()
    if as_json:
        out.print_json(data=[_base_json(b) for b in bases])
        return
    rows = [("NAME", "STATE", "KERNEL", "SIZE", "BUILT", "COLD BOOT", "RESTORE")]
    for b in bases:
        j = _base_json(b)
        boot = j.get("cold_boot_s")
        boot_s = f"{boot:.1f} s" if boot else "-"
        if j.get("init_ready_s"):
            boot_s += f" (systemd {j['init_ready_s']:.0f} s)"
        rows.append((j["name"], j["state"], j.get("kernel_version") or "-",
                     _size(j.get("size_bytes")), _when(j.get("built_at")), boot_s,
                     f"{j['restore_s']:.2f} s" if j.get("restore_s") else "-"))
    _print_columns(rows)


def _base_json(b) -> dict:
    if hasattr(b, "to_json"):
        return b.to_json()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(b).items()}


# ----------------------------------------------------------------------------- images

@image_app.command("build")
def image_build(
    path: Annotated[Path, typer.Argument(help="A Dockerfile, or a .py file defining an Image.")],
    name: Annotated[Optional[str], typer.Option("-n", "--name", help="Name to register.")] = None,
    context: Annotated[Optional[Path], typer.Option(
        "--context", "-c", help="Build context (default: the Dockerfile's folder).")] = None,
    build_arg: Annotated[list[str], typer.Option("--build-arg", help="ARG value, KEY=VALUE.")] = [],
    secret: Annotated[list[str], typer.Option(
        "--secret", help="RUN --mount=type=secret source: id=ID,src=FILE.")] = [],
    target: Annotated[Optional[str], typer.Option(
        "--target", help="Dockerfile stage to build (default: the last).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Build even if unchanged.")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Run every step again (ignore the step cache).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Do not echo step output.")] = False,
    progress: Annotated[str, typer.Option(
        "--progress", help="auto (a live view on a terminal, else plain), plain (prefixed "
        "lines) or tty (the live view).")] = "auto",
    project: ProjectOpt = None,
):
    """Build an image and register it in the project."""
    from localsbx.build.builder import build_image

    if name is not None and not name.strip():
        raise ConfigError("image build: -n/--name is empty",
                          hint="give a name, or leave -n out to use the definition's name")
    if path.is_dir():  # like `docker build DIR`: DIR/Dockerfile, DIR is the context
        path = path / "Dockerfile"
    if not path.exists():
        raise ConfigError(f"{path}: no such file",
                          hint="give a Dockerfile, a folder holding one, or a .py file")
    args = _pairs("--build-arg", build_arg)
    definition = load_definition(path, name=name, build_args=args, target=target)
    ctx = context if context is not None else path.resolve().parent
    t = time.monotonic()
    secrets = {}
    for item in secret:
        kv = dict(p.partition("=")[::2] for p in item.split(","))
        sid, src = kv.get("id"), kv.get("src") or kv.get("source")
        if not sid or not src:
            raise ConfigError(f"--secret {item}: expected id=ID,src=FILE")
        secrets[sid] = src
    if progress not in ("auto", "plain", "tty"):
        raise ConfigError(f"--progress {progress!r}: expected auto, plain or tty")
    live = progress == "tty" or progress == "auto" and err.is_terminal
    rep = _LiveReporter(quiet) if live else _CliReporter(quiet, plain=progress == "plain" or None)
    try:
        rec = build_image(definition, context_dir=ctx, name=name or definition.name,
                          project=project, reporter=rep, force=force, secrets=secrets,
                          no_cache=no_cache)
    except BaseException:
        rep.close(failed=True)
        raise
    rep.close()
    err.print(f"[green]built {rec.name}[/] in {time.monotonic() - t:.1f} s")
    if not sys.stdout.isatty():
        print(rec.name)


@image_app.command("ls")
def image_ls(as_json: JsonOpt = False, project: ProjectOpt = None):
    """List the project's images."""
    imgs = store.list_images(project)
    for _name, why in store.broken_images(project):
        err.print(f"[yellow]warning: {_esc(why)}[/]")
    if as_json:
        out.print_json(data=[_image_json(i) for i in imgs])
        return
    rows = [("NAME", "BASE", "DIGEST", "CREATED", "BUILD")]
    for i in imgs:
        rows.append((i.name, i.meta.base, i.digest[:12], _when(i.meta.created_at),
                     f"{i.meta.build_seconds} s"))
    _print_columns(rows)


def _image_json(i: store.ImageRecord) -> dict:
    return {"name": i.name, "project": i.project, "digest": i.digest, "path": str(i.path), **{
        k: i.meta.to_json().get(k) for k in ("base", "env", "workdir", "created_at", "build_seconds",
                                   "source", "snapshot", "warnings")}}


@image_app.command("describe")
def image_describe(name: str, project: ProjectOpt = None):
    """Show an image's metadata (JSON)."""
    i = store.lookup_image(name, project=project)
    out.print_json(data={**_image_json(i), "definition": i.meta.definition})


@image_app.command("rm")
def image_rm(name: str, project: ProjectOpt = None):
    """Unregister an image (its files go when nothing uses them)."""
    store.remove_image(name, project=project)
    err.print(f"removed {name}")


@image_app.command("history")
def image_history(name: str, as_json: JsonOpt = False, project: ProjectOpt = None):
    """Show an image's build steps: cached or run by the build that made it, time, size."""
    i = store.lookup_image(name, project=project)
    if not i.meta.steps:
        err.print(f"image {name} has no step history (built before the step cache)")
    if as_json:
        out.print_json(data=[vars(s) for s in i.meta.steps])
        return
    rows = [("STEP", "RESULT", "TIME", "SIZE", "INSTRUCTION")]
    for n, s in enumerate(i.meta.steps, 1):
        rows.append((str(n), "CACHED" if s.cached else "run", f"{s.seconds:.1f} s",
                     _size(s.size), s.step))
    _print_columns(rows)


@image_app.command("logs")
def image_logs(name: str, project: ProjectOpt = None):
    """Print the output of every build step of an image (cached steps: from the build that
    ran them)."""
    from localsbx import layers

    i = store.lookup_image(name, project=project)
    if not i.meta.steps:
        err.print(f"image {name} has no step logs (built before the step cache)")
    for n, s in enumerate(i.meta.steps, 1):
        print(f"#{n} {'CACHED ' if s.cached else ''}{s.step}", flush=True)
        data = layers.output(s.layer)
        sys.stdout.buffer.write(data if not data or data.endswith(b"\n") else data + b"\n")
        sys.stdout.buffer.flush()


# ----------------------------------------------------------------------------- sandboxes

@app.command("new")
def new(
    image: Annotated[Optional[str], typer.Option(
        "--image", "-i", help="Image or base name (default: the default base).")] = None,
    cpus: Annotated[Optional[int], typer.Option(help="vCPUs (default 1).")] = None,
    memory: Annotated[Optional[int], typer.Option("--memory", "-m", help="RAM in MiB (default 1024).")] = None,
    disk: Annotated[Optional[int], typer.Option(
        "--disk", help="Root disk in MiB (default the image's; bigger is grown at start).")] = None,
    timeout: Annotated[int, typer.Option("--timeout", "-t",
                                         help="Seconds of running time until it stops (0 = never).")] = 600,
    name: Annotated[Optional[str], typer.Option(help="A name, unique in the project.")] = None,
    snapshot: Annotated[Optional[str], typer.Option(
        "--snapshot", "-s", help="Start from a checkpoint (its id) instead of an image.")] = None,
    expose: Annotated[list[int], typer.Option("--expose", help="Guest TCP port to forward to "
                                              "127.0.0.1 (repeatable).")] = [],
    no_internet: Annotated[bool, typer.Option("--no-internet", help="No egress at all, DNS "
                                              "included (with --allow-out: only those, DNS "
                                              "only if its resolver is listed).")] = False,
    allow_out: Annotated[list[str], typer.Option(
        "--allow-out", metavar="CIDR|HOST", help="Only these destinations get out (repeatable; "
        "host names resolved now; DNS still works unless --no-internet).")] = [],
    deny_out: Annotated[list[str], typer.Option(
        "--deny-out", metavar="CIDR|HOST", help="Refuse these destinations (repeatable; wins "
        "over --allow-out).")] = [],
    project: ProjectOpt = None,
):
    """Start a sandbox (restored from its image's snapshot) and print its id."""
    from localsbx.sandbox import Sandbox

    if name is not None and not name.strip():
        raise ConfigError("new: --name is empty", hint="give a name, or leave --name out")
    t = time.monotonic()
    sb = Sandbox.create(image, cpus=cpus, memory_mb=memory, disk_mb=disk, timeout_secs=timeout,
                        project=project, detached=True, name=name, snapshot_id=snapshot,
                        exposed_ports=expose, allow_internet_access=not no_internet,
                        allow_out=allow_out, deny_out=deny_out)
    if sb.notice:
        err.print(f"[yellow]note:[/] {_esc(sb.notice)}")
    for gport, hport in sorted(sb.ports.items()):
        err.print(f"port {gport} -> 127.0.0.1:{hport}")
    if sys.stdout.isatty():
        how = "restored from snapshot" if sb.record.restored else "cold boot"
        out.print(f"{sb.sandbox_id}  [dim](image {sb.image}, {how}, "
                  f"{time.monotonic() - t:.2f} s; timeout {timeout} s)[/]")
    else:
        print(sb.sandbox_id)


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id or name.")],
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    env: Annotated[list[str], typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")] = [],
    workdir: Annotated[Optional[str], typer.Option("--workdir", "-w")] = None,
    user: Annotated[Optional[str], typer.Option("--user", "-u", help="NAME, UID or UID:GID "
                                                "(default: the image's USER).")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Seconds; kills the process tree.")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Pass stdin.")] = False,
    tty: Annotated[bool, typer.Option("--tty", "-t", help="Allocate a terminal (with -i: an "
                                      "interactive session, like docker exec -it).")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background; print "
                                         "its pid (see ps, logs, kill).")] = False,
    name: Annotated[Optional[str], typer.Option(help="With --detach: a name for the process.")] = None,
    project: ProjectOpt = None,
):
    """Run a command in a sandbox, streaming its output; exit with its exit code."""
    from localsbx._loop import run_sync
    from localsbx.sandbox import AsyncSandbox, Sandbox

    envd = _pairs("--env", env)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("exec: no command given", hint="localsbx exec ID -- CMD [ARGS...]")
    if detach:
        info = Sandbox.connect(sandbox_id, project=project).start_process(
            command, None, env=envd, working_dir=workdir, name=name,
            stdin_mode="pipe" if interactive else None)
        print(info["pid"])
        return
    if timeout is not None and not 0 < timeout < float("inf"):
        raise ConfigError(f"exec: --timeout must be positive seconds (got {timeout})")
    if tty:
        if not os.isatty(sys.stdin.fileno()):
            raise ConfigError("exec -t: stdin is not a terminal",
                              hint="drop -t to pipe data in (-i alone passes stdin)")
        raise typer.Exit(_interactive(sandbox_id, command, envd, workdir, project))
    data = sys.stdin.buffer if interactive else None  # streamed as it comes

    def w(stream):
        def cb(chunk: bytes) -> None:
            stream.write(chunk)
            stream.flush()
        return cb

    async def go():
        sb = await AsyncSandbox.connect(sandbox_id, project=project)
        return await sb.exec(command, env=envd, working_dir=workdir, timeout=timeout,
                             user=user, stdin=data, stdout_cb=w(sys.stdout.buffer),
                             stderr_cb=w(sys.stderr.buffer))

    res = run_sync(go())
    if res.timed_out:
        err.print(f"[red]localsbx: command timed out after {timeout} s; process tree killed[/]")
    raise typer.Exit(res.shell_code)


def _interactive(sandbox_id: str, command: list[str], env: dict, workdir: str | None,
                 project: str | None) -> int:
    """A command on a guest PTY with this terminal in raw mode."""
    import shutil
    import termios
    import tty as _tty

    from localsbx._loop import run_sync
    from localsbx.sandbox import AsyncSandbox

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    size = shutil.get_terminal_size()

    async def go() -> int:
        sb = await AsyncSandbox.connect(sandbox_id, project=project)
        return await sb.interactive(command, env=env, working_dir=workdir,
                                    term=os.environ.get("TERM", "xterm"),
                                    size=(size.columns, size.lines))

    try:
        _tty.setraw(fd)
        return run_sync(go())
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@app.command("ssh")
def ssh(sandbox_id: Annotated[str, typer.Argument(help="Sandbox id or name.")],
        shell: Annotated[str, typer.Option(help="The shell to run.")] = "/bin/sh",
        project: ProjectOpt = None):
    """An interactive shell in a sandbox (a real PTY; exits with the shell's code)."""
    if not os.isatty(sys.stdin.fileno()):
        raise ConfigError("ssh: stdin is not a terminal",
                          hint="use `localsbx exec -i ID -- CMD` to pipe data in")
    raise typer.Exit(_interactive(sandbox_id, [shell, "-l"] if shell.endswith("sh") else [shell],
                                  {}, None, project))


@app.command("ps")
def ps(sandbox_id: str, as_json: JsonOpt = False, project: ProjectOpt = None):
    """List a sandbox's background processes (started with exec --detach / start_process)."""
    from localsbx.sandbox import Sandbox

    procs = Sandbox.connect(sandbox_id, project=project).list_processes()
    if as_json:
        out.print_json(data=procs)
        return
    rows = [("PID", "NAME", "STATUS", "EXIT", "STARTED", "COMMAND")]
    for p in procs:
        ex = "-" if p["status"] == "running" else (
            f"signal {p['signal']}" if p["signal"] else str(p["exit_code"]))
        rows.append((str(p["pid"]), p["name"] or "-", p["status"], ex, _when(p["started_at"]),
                     " ".join([p["command"], *p["args"]])))
    _print_columns(rows)


@app.command("logs")
def logs(sandbox_id: str, pid: str,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until it ends.")] = False,
         project: ProjectOpt = None):
    """Print a background process's output (stdout to stdout, stderr to stderr)."""
    from localsbx.sandbox import Sandbox

    sb = Sandbox.connect(sandbox_id, project=project)

    def show(stream: str, line: str) -> None:
        print(line, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)

    if follow:
        sb.follow_output(pid, show)
        return
    o = sb.get_output(pid)
    for stream, line in zip(o["streams"], o["lines"]):
        show(stream, line)


@app.command("kill")
def kill(sandbox_id: str, pid: str,
         sig: Annotated[Optional[int], typer.Option("--signal", "-s", help="Signal number "
                                                    "(default: SIGKILL of its whole tree).")] = None,
         project: ProjectOpt = None):
    """Signal or kill a background process."""
    from localsbx.sandbox import Sandbox

    sb = Sandbox.connect(sandbox_id, project=project)
    if sig is None:  # waits for its end
        info = sb.kill_process(pid)
        err.print(f"process {info['pid']}: {info['status']}")
        return
    info = sb.send_signal(pid, sig)  # does not wait: the process decides what the signal does
    err.print(f"process {info['pid']}: signal {sig} sent; status when sent: {info['status']} "
              f"(`localsbx ps {sandbox_id}` shows it now)")


@app.command("ls")
def ls(as_json: JsonOpt = False, project: ProjectOpt = None):
    """List sandboxes (running, suspended, pending)."""
    from localsbx.sandbox import list_sandboxes

    recs = list_sandboxes(project)
    if as_json:
        out.print_json(data=[_sandbox_json(r) for r in recs])
        return
    now = time.time()
    rows = [("ID", "STATUS", "IMAGE", "NAME", "PROJECT", "CPUS", "MEMORY", "PORTS", "AGE",
             "TIME LEFT")]
    for r in recs:
        left = r.remaining_secs()
        ports = ",".join(f"{g}->{h}" for g, h in sorted(r.ports.items())) or "-"
        rows.append((r.id, r.state.value, r.image, r.name or "-", r.project, str(r.cpus),
                     f"{r.memory_mb} MiB", ports, f"{now - r.created_at:.0f} s",
                     "never" if left is None else f"{max(0.0, left):.0f} s"))
    _print_columns(rows)


def _sandbox_json(r: store.SandboxRecord) -> dict:
    d = r.to_json()
    d["status"] = r.state.value
    d["expires_at"] = r.deadline
    d["time_left_secs"] = r.remaining_secs()
    return d


@app.command("describe")
def describe(sandbox_id: str, project: ProjectOpt = None):
    """Show a sandbox (JSON)."""
    out.print_json(data=_sandbox_json(store.read_sandbox(sandbox_id, project=project)))


def _each(ids: list[str], project: str | None, verb: str, act) -> None:
    """Run ``act(AsyncSandbox)`` for every id; report each; exit 1 if any failed."""
    from localsbx._loop import run_sync
    from localsbx.sandbox import AsyncSandbox

    code = 0
    for sid in ids:
        try:
            async def go(sid=sid):
                sb = await AsyncSandbox.connect(sid, project=project)
                return sb, await act(sb)
            sb, res = run_sync(go())
        except LocalsbxError as exc:
            err.print(f"[red]error:[/] {_esc(str(exc))}")
            code = 1
            continue
        err.print(f"{verb} {sb.sandbox_id}" + (f" ({res})" if res else ""))
    raise typer.Exit(code)


@app.command("terminate")
def terminate(sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")],
              project: ProjectOpt = None):
    """Stop sandboxes and delete them."""
    _each(sandbox_ids, project, "terminated", lambda sb: sb.terminate())


@app.command("suspend")
def suspend(sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")],
            project: ProjectOpt = None):
    """Save sandboxes to disk and stop their QEMU (no CPU, no RAM; the timeout pauses)."""
    async def act(sb):
        res = await sb.suspend()
        return f"{res['seconds']:.1f} s, {_size(res['state_bytes'])} of state"
    _each(sandbox_ids, project, "suspended", act)


@app.command("resume")
def resume(sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")],
           project: ProjectOpt = None):
    """Resume suspended sandboxes."""
    _each(sandbox_ids, project, "resumed", lambda sb: sb.resume())


@app.command("checkpoint")
def checkpoint(sandbox_id: str,
               checkpoint_type: Annotated[str, typer.Option(
                   "--type", help="memory (RAM, processes and disk) or filesystem (disk).")] = "memory",
               project: ProjectOpt = None):
    """Checkpoint a running sandbox and print the checkpoint id (for `new --snapshot`)."""
    from localsbx.sandbox import Sandbox

    c = Sandbox.connect(sandbox_id, project=project).checkpoint(checkpoint_type)
    err.print(f"checkpoint {c.id} of {c.sandbox_id} ({c.kind}, {_size(c.size_bytes)})")
    print(c.id)


@snapshot_app.command("ls")
def snapshot_ls(sandbox_id: Annotated[Optional[str], typer.Argument(
        help="Only this sandbox's.")] = None, as_json: JsonOpt = False):
    """List checkpoints."""
    cks = store.list_checkpoints(sandbox_id)
    if as_json:
        out.print_json(data=[c.to_json() for c in cks])
        return
    rows = [("ID", "SANDBOX", "IMAGE", "TYPE", "SIZE", "CREATED")]
    for c in cks:
        rows.append((c.id, c.sandbox_id, c.image, c.kind, _size(c.size_bytes), _when(c.created_at)))
    _print_columns(rows)


@snapshot_app.command("rm")
def snapshot_rm(checkpoint_ids: list[str]):
    """Delete checkpoints (not while a sandbox restored from one runs)."""
    for cid in checkpoint_ids:
        store.delete_checkpoint(cid)
        err.print(f"deleted {cid}")


@app.command("expose")
def expose(sandbox_id: str, port: int,
           host_port: Annotated[int, typer.Option(help="Host port (default: any free one).")] = 0,
           project: ProjectOpt = None):
    """Forward a guest TCP port to 127.0.0.1 on the host; prints the host port."""
    from localsbx.sandbox import Sandbox

    hp = Sandbox.connect(sandbox_id, project=project).expose_port(port, host_port=host_port)
    err.print(f"port {port} -> 127.0.0.1:{hp}")
    print(hp)


@app.command("desktop")
def desktop(sandbox_id: str,
            screenshot: Annotated[Optional[Path], typer.Option(
                "--screenshot", help="Write the screen to this PNG file.")] = None,
            type_text: Annotated[Optional[str], typer.Option("--type", help="Type this text.")]
            = None,
            key: Annotated[Optional[str], typer.Option("--key", help="Press a key (enter, ctrl-c).")]
            = None,
            click: Annotated[Optional[str], typer.Option("--click", help="Click at X,Y.")] = None,
            port: Annotated[int, typer.Option(help="The guest's VNC port.")] = 5901,
            password: Annotated[Optional[str], typer.Option(
                help="VNC password (default: the desktop bases' 'tensorlake').")] = None,
            project: ProjectOpt = None):
    """Drive a sandbox's VNC desktop (a *-vnc base): click, type, keys, then a screenshot.
    For a viewer, `localsbx expose ID 5901` (or `new --expose 5901`) and connect to it."""
    from localsbx.sandbox import Sandbox

    with Sandbox.connect(sandbox_id, project=project).connect_desktop(port, password) as d:
        if click:
            x, _, y = click.partition(",")
            try:
                d.click(int(x), int(y))
            except ValueError:
                raise ConfigError(f"--click {click!r}: expected X,Y") from None
        if type_text:
            d.type_text(type_text)
        if key:
            d.press(key)
        if screenshot:
            screenshot.write_bytes(d.screenshot())
            err.print(f"screen {d.width}x{d.height} -> {screenshot}")


@app.command("unexpose")
def unexpose(sandbox_id: str, port: int, project: ProjectOpt = None):
    """Stop forwarding a guest port."""
    from localsbx.sandbox import Sandbox

    Sandbox.connect(sandbox_id, project=project).unexpose_port(port)


@app.command("update")
def update(sandbox_id: str,
           name: Annotated[Optional[str], typer.Option(help="New name (unique in the project).")] = None,
           timeout: Annotated[Optional[int], typer.Option(
               "--timeout", help="Seconds of running time from its start (0 = never).")] = None,
           project: ProjectOpt = None):
    """Rename a sandbox or change its timeout."""
    from localsbx.sandbox import Sandbox

    Sandbox.connect(sandbox_id, project=project).update(name=name, timeout_secs=timeout)


@app.command("cp")
def cp(src: str, dst: str, project: ProjectOpt = None):
    """Copy a file or folder between host and sandbox: one side is ID:/path (or NAME:/path)."""
    from localsbx.sandbox import Sandbox

    def split(p: str):
        sid, sep, path = p.partition(":")
        if sep and path.startswith("/") and "/" not in sid and sid:
            return sid, path
        return None, p

    (s_id, s_path), (d_id, d_path) = split(src), split(dst)
    if bool(s_id) == bool(d_id):
        raise ConfigError("cp: exactly one side must be a sandbox path ID:/abs/path",
                          hint="localsbx cp ./file ID:/tmp/file  or  localsbx cp ID:/etc/os-release .")
    sb = Sandbox.connect(s_id or d_id, project=project)
    if s_id:
        sb.download(s_path, d_path)
    else:
        sb.upload(Path(s_path), d_path)


# ----------------------------------------------------------------------------- doctor / gc

@app.command("doctor")
def doctor(refresh: Annotated[bool, typer.Option("--refresh", help="Probe KVM again.")] = False):
    """Check the host: QEMU, tools, base images, acceleration (KVM probe / TCG)."""
    import asyncio
    import shutil

    from localsbx.base import list_bases
    from localsbx.vm.accel import choose_accel
    from localsbx.vm.qemu import qemu_version

    ok = True
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "busybox", "timeout"):
        found = shutil.which(tool)
        ok &= bool(found)
        out.print(f"{'[green]ok[/]' if found else '[red]missing[/]':>20}  {tool}")
    with_version = qemu_version() if shutil.which("qemu-system-x86_64") else "-"
    out.print(f"{'':>11}QEMU: {with_version}")
    bases = list_bases()
    for b in bases:
        j = _base_json(b)
        mark = "[green]built[/]" if j.get("state") == "built" else f"[yellow]{j.get('state')}[/]"
        out.print(f"{'base':>20}  {j['name']}: {mark} {j.get('kernel_version') or ''}")
    built = [b for b in bases if b.built]  # outdated ones included: they still boot
    if not built:
        out.print("[yellow]no base image built[/]: run `localsbx base build debian-minimal`")
        raise typer.Exit(1)
    from localsbx.base import get_base

    b = get_base(_base_json(built[0])["name"])
    accel = asyncio.run(choose_accel(b.kernel, b.initrd, refresh=refresh))
    out.print(f"accelerator: [bold]{accel.kind.upper()}[/] - {_esc(accel.reason)}")
    out.print(f"store: {store.paths.data_dir()}")
    raise typer.Exit(0 if ok else 1)


@app.command("gc")
def gc():
    """Reap sandboxes whose QEMU or owner is gone and half-written builds."""
    n = store.reap()
    gone = store.gc_images()
    err.print(f"reaped {n} sandbox(es); removed {len(gone)} unused image folder(s)")


@app.command("prune")
def prune():
    """Free what no image uses: unused image folders and cached build steps no image needs
    (never what an image, a running sandbox or a checkpoint still uses)."""
    from localsbx import layers

    rep = layers.prune()
    err.print(f"removed {len(rep.layers)} cached step(s) and {len(rep.images)} image folder(s), "
              f"freed {_size(rep.freed_bytes) if rep.freed_bytes else '0 B'}; "
              f"kept {rep.kept_layers} step(s) in use")


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (the SDK's localhost "
                                      "default is 8900).")] = 8900,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LOCALSBX_SERVE_API_KEY",
        help="Require this bearer token (the SDK sends TENSORLAKE_API_KEY).")] = None,
    project: ProjectOpt = None,
):
    """Serve Tensorlake's HTTP API, so the real tensorlake SDK runs against localsbx:
    export TENSORLAKE_API_URL=http://127.0.0.1:8900 TENSORLAKE_API_KEY=local."""
    import logging

    from localsbx.serve import serve

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1-65535")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach it can run "
                  "code in your sandboxes" + ("" if api_key else " (no --api-key set)"))
    debug = logging.getLogger("localsbx").isEnabledFor(logging.INFO)
    err.print(f"localsbx serve on http://{host}:{port}  (export TENSORLAKE_API_URL="
              f"http://{host}:{port} TENSORLAKE_API_KEY={api_key or 'local'})")
    serve(host, port, api_key=api_key, project=project, debug=debug)


# ----------------------------------------------------------------------------- helpers

def _print_columns(rows: list[tuple[str, ...]]) -> None:
    """Plain aligned columns (like ``docker ps``): never truncated, easy to cut/awk."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _size(n) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(ts) -> str:
    if not ts:
        return "-"
    if isinstance(ts, str):
        return ts
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except LocalsbxError as exc:
        err.print(f"[red]error:[/] {_esc(exc.message)}")
        if getattr(exc, "output_tail", "") and not _streamed_output:
            err.print("[dim]--- output (tail) ---[/]")
            err.print(_esc(exc.output_tail))
        if getattr(exc, "returncode", None) is not None:
            err.print(f"[dim]exit status: {exc.returncode}[/]")
        if getattr(exc, "log_tail", ""):
            err.print("[dim]--- log (tail) ---[/]")
            err.print(_esc(exc.log_tail))
        if exc.hint:
            err.print(f"[cyan]hint:[/] {_esc(exc.hint)}")
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        # Usage errors come from click, which typer may vendor (typer._click): match by name.
        names = {c.__name__ for c in type(exc).__mro__}
        if "ClickException" in names:
            exc.show()
            sys.exit(exc.exit_code)
        if "Abort" in names:
            err.print("[red]interrupted[/]")
            sys.exit(130)
        if "Exit" in names:
            sys.exit(getattr(exc, "exit_code", 0))
        raise


if __name__ == "__main__":
    main()
