"""Dockerfile -> :class:`~localsbx.definition.ops.ImageDefinition`.

Usage::

    defn = parse_dockerfile("Dockerfile", name="myimg", known_bases={"debian-minimal"})

Parser choice
-------------
Both installed libraries were run over every Dockerfile in the shared case folder:

``dockerfile-parse`` (2.0.1)
    Knows no heredocs at all: the bodies of B03/B04/B05/B06 come back as instructions
    (``ECHO``, ``DECLARE``, ``EOF``, even ``WORKDIR /this/line/is/file/content...`` in B05).
    An empty line inside a continuation ends the instruction (B01 second RUN becomes
    ``RUN echo alpha`` plus an instruction ``&&``). Flags stay inside the value, no JSON
    detection, ``ENV``/``ARG`` values keep their quotes.

``dockerfile`` (3.4, a wrapper of BuildKit's own Go parser) -- **chosen**
    The reference grammar: continuations, comments inside continuations and empty
    continuation lines (B01), ``# escape=``, line numbers, flags split from arguments,
    exec-form JSON detection (B18: ``['echo', 'not-json']`` stays shell form), ``ENV``
    key/value splitting (``EMPTY= AFTER_EMPTY=yes`` right, B07), ``<<EOF``/``<<-EOF``
    heredocs. What it gets wrong, and what this module does around it:

    - ``<< 'EOF'`` with a space (B05) is not a heredoc for this BuildKit version: its body
      lines come back as instructions. We find heredoc markers ourselves (BuildKit >= 0.22
      rules: the word after a bare ``<<``/``<<-`` is the delimiter), read the bodies from
      the raw lines and re-parse what follows the last delimiter, so body lines are never
      instructions.
    - heredoc bodies keep ``\\r`` (B06) and ``<<-`` bodies keep their TABs: we normalise
      CRLF before parsing (BuildKit's line scanner drops the CR of every line) and strip
      TABs ourselves before looking for a shebang (B04, moby/buildkit#6402).
    - errors (``ENV must have two arguments``, ``unterminated heredoc``) carry no line:
      we find the line by re-parsing prefixes.
    - words are raw (quotes kept): Docker's word processing is :mod:`.words`.

Semantics (BuildKit's dispatcher, unless noted)
-----------------------------------------------
``FROM`` names a localsbx base; pre-``FROM`` ``ARG`` values may be used in it. ``RUN``
shell form is ``/bin/sh -c`` (no errexit); exec form only for a JSON array of strings.
A heredoc that is the whole ``RUN`` command is a script: with a shebang it is run by that
interpreter (``Run.script``), else by ``/bin/sh -c`` (B03, B04); any other heredoc goes to
``/bin/sh -c`` with its body (the shell reads it, B05). ``ARG`` values are build-time only
(``Run.build_env``). Tensorlake's rule for the rest: ``EXPOSE LABEL VOLUME STOPSIGNAL
SHELL HEALTHCHECK ONBUILD`` (and the deprecated ``MAINTAINER``) are accepted with a warning
because they have no effect on a sandbox; unknown instructions are errors. Multi-stage:
every ``FROM`` starts a stage (``AS name``); ``COPY --from=REF`` names an earlier stage (by
name, case-insensitive, or index) and otherwise, as in BuildKit, an image (``Copy.from_image``,
resolved by the builder as ``FROM`` is; with ``known_bases`` given, a name that is neither a
known image/base nor a registry reference is a located error here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import dockerfile as bk

from localsbx.definition.ops import (
    DEFAULT_PATH,
    Add,
    Copy,
    Env,
    ImageDefinition,
    Mount,
    Op,
    Run,
    Stage,
    User,
    Workdir,
    resolve_path,
)
from localsbx.definition.words import WordError, process_word, split_raw_words
from localsbx.errors import DefinitionError, SourceLocation
from localsbx.oci import names_registry_image

__all__ = ["parse_dockerfile", "run_from_text", "copy_op"]

#: Instructions Tensorlake's builder accepts but that do nothing for a sandbox: warned.
WARNED = frozenset(
    {"EXPOSE", "LABEL", "VOLUME", "STOPSIGNAL", "SHELL", "HEALTHCHECK", "ONBUILD", "MAINTAINER"}
)
_HINTS: dict[str, str] = {}
_KNOWN = frozenset({"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD",
                    "ENTRYPOINT"}) | WARNED
_HEREDOC_WORD = re.compile(r"(\d*)<<(-?)(.*)", re.S)
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_CHMOD = re.compile(r"[0-7]{3,4}")
_COPY_FLAGS = {"chown", "chmod"}


@dataclass(frozen=True)
class _Heredoc:
    """One heredoc of an instruction: delimiter, ``<<-``, raw body lines (no newline)."""

    name: str
    chomp: bool
    lines: tuple[str, ...]
    delimiter_line: str

    @property
    def body(self) -> str:
        """The content BuildKit hands over: TABs stripped for ``<<-``, LF endings."""
        return "".join((ln.lstrip("\t") if self.chomp else ln) + "\n" for ln in self.lines)

    @property
    def raw(self) -> str:
        """Body and delimiter as written, for a shell that reads the heredoc itself."""
        return "".join(ln + "\n" for ln in (*self.lines, self.delimiter_line))


@dataclass(frozen=True)
class _Instr:
    """One instruction: the library node plus our heredocs and where its text ends."""

    node: bk.Command
    heredocs: tuple[_Heredoc, ...]
    whole_heredoc: bool  # the command is exactly one heredoc marker
    blank_continuation: bool

    @property
    def cmd(self) -> str:
        return self.node.cmd.upper()

    @property
    def line(self) -> int:
        return self.node.start_line

    @property
    def text(self) -> str:
        """The argument text of the first logical line (no keyword), for messages."""
        first = self.node.original.split("\n", 1)[0]
        return first.split(None, 1)[1] if len(first.split(None, 1)) > 1 else ""


# --------------------------------------------------------------------------- splitting


def _read_source(path_or_text: str | os.PathLike, source: str | None) -> tuple[str, str]:
    """Return ``(text, source-name)``; a ``Path`` or an existing file name is read."""
    is_file = isinstance(path_or_text, os.PathLike) or (
        "\n" not in path_or_text and Path(path_or_text).is_file()
    )
    if not is_file:
        return str(path_or_text), source or "<string>"
    path = Path(path_or_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DefinitionError(
            f"cannot read Dockerfile {path}: {exc.strerror or exc}",
            location=SourceLocation(str(path)),
            hint="pass the path of an existing Dockerfile (-f PATH)",
        ) from exc
    try:
        return data.decode("utf-8"), source or str(path)
    except UnicodeDecodeError as exc:
        raise DefinitionError(
            f"Dockerfile is not UTF-8 text (byte {exc.start})",
            location=SourceLocation(source or str(path)),
            hint="save the Dockerfile as UTF-8",
        ) from exc


def _normalise(text: str) -> str:
    """Drop a UTF-8 BOM and the CR of CRLF line ends (BuildKit's ``bufio.ScanLines``)."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    return text[:-1] if text.endswith("\r") else text


def _escape_token(lines: list[str]) -> str:
    """The ``# escape=`` parser directive (only valid above everything else)."""
    for ln in lines:
        m = _DIRECTIVE.match(ln)
        if not m:
            break
        if m.group(1).lower() == "escape" and m.group(2) in ("`", "\\"):
            return m.group(2)
    return "\\"


def _lib_parse(lines: list[str], src: str) -> list[bk.Command]:
    """Parse with BuildKit's parser; turn its errors into located :class:`DefinitionError`."""
    try:
        return list(bk.parse_string("\n".join(lines)))
    except bk.GoParseError as exc:
        msg = str(exc)
        if msg.startswith("file with no instructions"):
            return []
        line = None
        for n in range(1, len(lines) + 1):  # the first prefix that fails the same way
            try:
                bk.parse_string("\n".join(lines[:n]))
            except bk.GoParseError as sub:
                if str(sub) == msg:
                    line = n
                    break
            except UnicodeDecodeError:
                raise _split_character(src, n) from exc
        raise DefinitionError(
            f"Dockerfile syntax error: {msg}",
            location=SourceLocation(src, line),
            hint="fix the instruction at this line (see the Dockerfile reference)",
        ) from exc
    except UnicodeDecodeError as exc:  # the Go parser split a multi-byte character
        line = next((n for n in range(1, len(lines) + 1)
                     if not _parses_as_text(lines[n - 1])), None)
        raise _split_character(src, line) from exc


def _split_character(src: str, line: int | None) -> DefinitionError:
    return DefinitionError(
        "Dockerfile syntax error: BuildKit's parser split a non-ASCII character (a "
        "Unicode space such as U+00A0 or U+0085 where a plain space belongs?)",
        location=SourceLocation(src, line),
        hint="use plain spaces between an instruction's words")


def _parses_as_text(line: str) -> bool:
    try:
        list(bk.parse_string(line))
    except UnicodeDecodeError:
        return False
    except bk.GoParseError:
        pass
    return True


def _heredoc_marks(words: list[str], escape: str) -> tuple[list[tuple[str, bool]], bool]:
    """Heredoc markers in a command's raw words: ``[(delimiter, chomp)]`` and whether the
    command is exactly one marker. ``<<EOF``, ``<<-EOF``, ``<<'EOF'``, ``<< EOF``
    (BuildKit >= 0.22) count; ``<<<`` does not."""
    marks: list[tuple[str, bool]] = []
    i, used = 0, 0
    while i < len(words):
        m = _HEREDOC_WORD.fullmatch(words[i])
        if m and "<" not in m.group(3):
            rest, n = m.group(3), 1
            if not rest and i + 1 < len(words) and "<" not in words[i + 1]:
                rest, n = words[i + 1], 2
            if rest:
                try:
                    name = process_word(rest, {}, escape)
                except WordError:
                    name = ""
                if name:
                    marks.append((name, m.group(2) == "-"))
                    used += n
                    i += n
                    continue
        i += 1
    return marks, len(marks) == 1 and used == len(words)


def _split(lines: list[str], src: str, escape: str) -> list[_Instr]:
    """Instructions with their heredocs; body lines are never parsed as instructions.

    The library parses the text; when it misses a heredoc (``<< EOF``) we read the body
    ourselves and parse again from the line after the delimiter, earlier lines blanked
    (parser directives kept) so line numbers stay right. When the library fails on a line
    that may be inside such a body, the part above that line is handled first.
    """
    out: list[_Instr] = []
    n_directives = 0
    while n_directives < len(lines) and _DIRECTIVE.match(lines[n_directives]):
        n_directives += 1
    consumed = 0
    while True:
        keep = max(consumed, n_directives)
        masked = lines[:n_directives] + [""] * (keep - n_directives) + lines[keep:]
        try:
            nodes, error = _lib_parse(masked, src), None
        except DefinitionError as exc:
            line = exc.location.line if exc.location else None
            if not line or line <= keep + 1:
                raise
            nodes, error = _lib_parse(masked[: line - 1], src), exc
        restart = _take(nodes, lines, src, escape, out)
        if restart is None:
            if error is not None:
                raise error
            return out
        consumed = restart


def _take(nodes: list[bk.Command], lines: list[str], src: str, escape: str,
          out: list[_Instr]) -> int | None:
    """Append ``nodes`` to ``out`` with their heredocs; return the line to re-parse after
    when the library missed a heredoc, else ``None``."""
    for node in nodes:
        if node.cmd is None:  # an empty continuation line (``\`` alone): nothing to run
            continue
        cmd = node.cmd.upper()
        marks: list[tuple[str, bool]] = []
        whole = False
        if cmd in ("RUN", "COPY", "ADD") and not node.json and node.value:
            words = (split_raw_words(node.value[0], escape) if cmd == "RUN"
                     else list(node.value))
            marks, whole = _heredoc_marks(words, escape)
        cmd_end = node.end_line - sum(h.content.count("\n") + 1 for h in node.heredocs)
        blank = any(not lines[i].strip() for i in range(node.start_line, cmd_end))
        if not marks:
            out.append(_Instr(node, (), False, blank))
            continue
        docs, last = _read_heredocs(lines, cmd_end, marks, src, node.start_line)
        out.append(_Instr(node, docs, whole, blank))
        if last != node.end_line:  # the library did not see these heredocs
            return last
    return None


def _read_heredocs(
    lines: list[str], cmd_end: int, marks: list[tuple[str, bool]], src: str, line: int
) -> tuple[tuple[_Heredoc, ...], int]:
    """Read the bodies following line ``cmd_end``; return them and the last line used."""
    idx = cmd_end  # 0-based index of the first body line
    docs = []
    for name, chomp in marks:
        body: list[str] = []
        while True:
            if idx >= len(lines):
                raise DefinitionError(
                    f"unterminated heredoc <<{'-' if chomp else ''}{name}: no line "
                    f"{name!r} closes it",
                    location=SourceLocation(src, line),
                    hint=f"end the heredoc with a line containing only {name}"
                    + (" (leading TABs allowed with <<-)" if chomp else ""),
                )
            ln = lines[idx]
            idx += 1
            if (ln.lstrip("\t") if chomp else ln) == name:
                docs.append(_Heredoc(name, chomp, tuple(body), ln))
                break
            body.append(ln)
    return tuple(docs), idx


# --------------------------------------------------------------------------- shared with the DSL


def run_from_text(
    command: str,
    *,
    build_env: tuple[tuple[str, str], ...] = (),
    location: SourceLocation | None = None,
    warnings: list[str] | None = None,
    shell: tuple[str, ...] = ("/bin/sh", "-c"),
) -> Run:
    """The ``Run`` op for a ``RUN`` argument text without heredocs (Docker's rule).

    A valid JSON array of strings is exec form; anything else, including
    ``['echo', 'x']`` (B18), is shell form ``("/bin/sh", "-c", command)``, with a warning
    that exec form needs double quotes when the text looks like a failed JSON array.

    :param command: the text after ``RUN`` (flags removed).
    :param build_env: in-scope ``ARG`` values.
    :param location: where the instruction is, for the op and messages.
    :param warnings: list to append warnings to.
    :returns: the op.
    :raises DefinitionError: for an empty command or an empty JSON array.
    """
    text = command.strip()
    if not text:
        raise DefinitionError("RUN needs a command", location=location,
                              hint="write RUN <command> or RUN [\"exe\", \"arg\"]")
    if text.startswith("["):
        try:
            argv = json.loads(text)
        except ValueError:
            argv = None
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            if not argv:
                raise DefinitionError("RUN [] has no command", location=location,
                                      hint="give the program and its arguments")
            return Run(tuple(argv), shell=False, build_env=build_env, location=location,
                       text=command)
        if text.endswith("]") and warnings is not None:
            where = f"line {location.line}: " if location and location.line else ""
            warnings.append(
                f"{where}RUN {text} is not a JSON array of strings, so it runs in shell form "
                "(/bin/sh -c); exec form needs double quotes: RUN [\"prog\", \"arg\"]"
            )
    return Run((*shell, command), shell=True, build_env=build_env,
               location=location, text=command)


def copy_op(
    kind: type[Copy],
    sources: list[str],
    dest: str,
    flags: Mapping[str, str],
    *,
    workdir: str,
    location: SourceLocation | None,
    text: str = "",
) -> Copy:
    """Build a ``Copy``/``Add`` op with Docker's checks (shared by Dockerfile and DSL).

    :param kind: :class:`Copy` or :class:`Add`.
    :param sources: sources as written, already word-processed.
    :param dest: destination, already word-processed; relative to ``workdir``.
    :param flags: ``chown``/``chmod`` values; any other key is an error.
    :param workdir: the current WORKDIR.
    :param location: where the instruction is.
    :param text: the instruction text, for messages.
    :returns: the op.
    :raises DefinitionError: for unsupported flags, a bad ``--chmod``, no source, or
        several sources with a destination that does not end in ``/``.
    """
    name = kind.__name__.upper()
    for key in flags:
        if key == "from":
            raise DefinitionError(
                f"{name} --from is not supported: localsbx builds single-stage images",
                location=location,
                hint="copy the files from the build context instead, or build the artefact "
                "in a RUN step of this image",
            )
        if key not in _COPY_FLAGS:
            raise DefinitionError(
                f"{name} flag --{key} is not supported", location=location,
                hint="supported flags: --chown=USER[:GROUP], --chmod=OCTAL",
            )
    for key in _COPY_FLAGS & set(flags):
        if not flags[key]:
            raise DefinitionError(f"{name} --{key} needs a value", location=location,
                                  hint=f"write --{key}=VALUE or remove the flag")
    chmod = flags.get("chmod")
    if chmod is not None and not _CHMOD.fullmatch(chmod):
        raise DefinitionError(f"{name} --chmod={chmod}: not an octal mode", location=location,
                              hint="write the mode in octal, e.g. --chmod=0755")
    chown = flags.get("chown")
    if chown is not None and (not chown or chown.startswith(":") or chown.count(":") > 1):
        raise DefinitionError(f"{name} --chown={chown}: expected USER[:GROUP]",
                              location=location, hint="e.g. --chown=app:app or --chown=1000")
    if not sources or not dest:
        raise DefinitionError(f"{name} needs at least one source and a destination",
                              location=location, hint=f"write {name} SRC... DEST")
    if len(sources) > 1 and not dest.endswith("/"):
        raise DefinitionError(
            f"{name} with more than one source needs a destination directory ending in '/'",
            location=location, hint=f"write the destination as {dest}/",
        )
    return kind(tuple(sources), resolve_path(workdir, dest), chown=chown, chmod=chmod,
                location=location, text=text)


# --------------------------------------------------------------------------- semantics


class _Reader:
    """Walks the instructions once, keeping Docker's state (ARGs, ENV, WORKDIR)."""

    def __init__(self, src: str, escape: str, build_args: Mapping[str, str]) -> None:
        self.src = src
        self.esc = escape
        self.build_args = dict(build_args)
        self.used_args: set[str] = set()
        self.meta: dict[str, str | None] = {}
        self.args: dict[str, str | None] = {}
        self.env: dict[str, str] = {"PATH": DEFAULT_PATH}
        self.workdir = "/"
        self.base: str | None = None
        self.from_line = 0
        self.ops: list[Op] = []
        self.warnings: list[str] = []
        self.shell: tuple[str, ...] = ("/bin/sh", "-c")
        self.cmd: tuple[str, ...] | None = None
        self.entrypoint: tuple[str, ...] | None = None
        self.stages: list[dict] = []
        self.stage_name: str | None = None
        #: names FROM / COPY --from may use besides stages (None: not checked here)
        self.known: frozenset[str] | None = None

    def loc(self, ins: _Instr) -> SourceLocation:
        return SourceLocation(self.src, ins.line)

    def scope(self) -> dict[str, str]:
        """Variables for substitution: ARG values, then ENV (ENV wins, as in Docker)."""
        scope = {k: v for k, v in self.args.items() if v is not None}
        scope.update(self.env)
        return scope

    def word(self, ins: _Instr, raw: str, env: Mapping[str, str] | None = None) -> str:
        try:
            return process_word(raw, self.scope() if env is None else env, self.esc)
        except WordError as exc:
            raise DefinitionError(f"{ins.cmd}: {exc}", location=self.loc(ins),
                                  hint="check the quotes and ${...} in this line") from exc

    def warn(self, ins: _Instr, text: str) -> None:
        self.warnings.append(f"line {ins.line}: {text}")

    def flags(self, ins: _Instr) -> dict[str, str]:
        out: dict[str, str] = {}
        for flag in ins.node.flags:
            key, _, value = flag[2:].partition("=")
            out[key.lower()] = self.word(ins, value)
        return out

    # -- instructions

    def do_arg(self, ins: _Instr) -> None:
        if not ins.node.value:
            raise DefinitionError("ARG needs a name", location=self.loc(ins),
                                  hint="write ARG NAME or ARG NAME=default")
        for item in ins.node.value:
            name, sep, raw = item.partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise DefinitionError(f"ARG {item}: {name!r} is not a valid name",
                                      location=self.loc(ins),
                                      hint="ARG names are letters, digits and _")
            if self.base is None:
                scope = {k: v for k, v in self.meta.items() if v is not None}
                default = self.word(ins, raw, scope) if sep else None
                value = self.build_args.get(name, default)
                self.meta[name] = value
            else:
                default = self.word(ins, raw) if sep else None
                if name in self.build_args:
                    value = self.build_args[name]
                elif sep:
                    value = default
                else:
                    value = self.meta.get(name)
                self.args[name] = value
            if name in self.build_args:
                self.used_args.add(name)

    def finish_stage(self) -> None:
        """Keep the stage read so far (at a later FROM and at the end)."""
        self.stages.append({
            "name": self.stage_name, "base": self.base, "ops": list(self.ops),
            "env": dict(self.env), "workdir": self.workdir, "shell": self.shell,
            "cmd": self.cmd, "entrypoint": self.entrypoint, "line": self.from_line})

    def find_stage(self, ref: str) -> int | None:
        if ref.isdigit() and int(ref) < len(self.stages):
            return int(ref)
        for i, st in enumerate(self.stages):
            if st["name"] is not None and st["name"] == ref.lower():
                return i
        return None

    def do_from(self, ins: _Instr, known: frozenset[str] | None) -> None:
        if self.base is not None:
            self.finish_stage()
        if ins.node.flags:
            raise DefinitionError(f"FROM flag {ins.node.flags[0]} is not supported",
                                  location=self.loc(ins),
                                  hint="write FROM <base> (localsbx builds for the host)")
        value = ins.node.value
        if not (len(value) == 1 or (len(value) == 3 and value[1].upper() == "AS")):
            raise DefinitionError("FROM expects one base name (optionally AS NAME)",
                                  location=self.loc(ins), hint="write FROM debian-minimal")
        scope = {k: v for k, v in self.meta.items() if v is not None}
        base = self.word(ins, value[0], scope)
        self.stage_name = value[2].lower() if len(value) == 3 else None
        self.args = {}
        parent = self.find_stage(base) if not base.isdigit() else None
        if parent is not None:  # FROM an earlier stage: its ops and config first
            st = self.stages[parent]
            self.base, self.from_line = st["base"], ins.line
            self.ops, self.env, self.workdir = list(st["ops"]), dict(st["env"]), st["workdir"]
            self.shell, self.cmd, self.entrypoint = st["shell"], st["cmd"], st["entrypoint"]
            return
        self.ops, self.env, self.workdir = [], {"PATH": DEFAULT_PATH}, "/"
        self.shell, self.cmd, self.entrypoint = ("/bin/sh", "-c"), None, None
        if known is not None and base not in known and not names_registry_image(base):
            listed = ", ".join(sorted(known)) or "(none built yet)"
            raise DefinitionError(
                f"unknown base image {base!r}" + (f" (from {value[0]})" if base != value[0]
                                                  else "")
                + f"; images and bases known here (a base may still need building): {listed}",
                location=self.loc(ins),
                hint="use one of the known bases, build it with `localsbx base build NAME`, "
                     "or name a registry image with its tag (NAME:TAG, REGISTRY/REPO:TAG)",
            )
        self.base, self.from_line = base, ins.line

    def do_env(self, ins: _Instr) -> None:
        value = ins.node.value
        if not value:  # BuildKit: errAtLeastOneArgument
            raise DefinitionError("ENV requires at least one argument", location=self.loc(ins),
                                  hint="write ENV NAME=value")
        first = ins.text.split(None, 1)[0] if ins.text else ""
        if "=" not in first:
            self.warn(ins, "legacy 'ENV key value' form; prefer ENV key=value "
                      "(BuildKit LegacyKeyValueFormat)")
        scope = self.scope()  # every pair sees the environment before this line
        pairs = []
        for k, v in zip(value[0::2], value[1::2]):
            key = self.word(ins, k, scope)
            if not key or "=" in key:
                raise DefinitionError(f"ENV: bad variable name {key!r}",
                                      location=self.loc(ins), hint="write ENV NAME=value")
            pairs.append((key, self.word(ins, v, scope)))
        for key, val in pairs:
            self.env[key] = val
            self.ops.append(Env(key, val, location=self.loc(ins), text=ins.text))

    def build_env(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.args.items() if v is not None and k not in self.env)

    def mounts(self, ins: _Instr) -> tuple[Mount, ...]:
        out = []
        for flag in ins.node.flags:
            key, _, value = flag[2:].partition("=")
            key = key.lower()
            if key == "network" and value in ("default", "none", "host"):
                self.warn(ins, f"RUN --network={value} ignored (build steps have the "
                          "build VM's network)")
                continue
            if key != "mount":
                raise DefinitionError(
                    f"RUN flag {flag} is not supported by localsbx", location=self.loc(ins),
                    hint="supported: --mount=type=cache|tmpfs|secret|bind,...")
            kv: dict[str, str] = {}
            for item in self.word(ins, value).split(","):
                k, sep, v = item.partition("=")
                kv[k.strip().lower()] = v if sep else "true"
            typ = kv.pop("type", "bind")
            target = kv.pop("target", kv.pop("dst", kv.pop("destination", "")))
            mid = kv.pop("id", "")
            if typ == "secret":
                if not mid:
                    mid = posixpath.basename(target)
                target = target or f"/run/secrets/{mid}"
            if typ not in ("cache", "tmpfs", "secret", "bind") or not target or not mid and \
                    typ == "secret":
                raise DefinitionError(
                    f"RUN --mount={value}: needs type=cache|tmpfs|secret|bind and a target",
                    location=self.loc(ins), hint="e.g. --mount=type=cache,target=/root/.cache")
            src = kv.pop("source", kv.pop("src", ""))
            frm = kv.pop("from", None)
            from_stage = None
            if frm is not None:
                idx = self.find_stage(frm)
                if idx is None:
                    raise DefinitionError(f"RUN --mount from={frm}: no such earlier stage",
                                          location=self.loc(ins),
                                          hint="name a stage defined above")
                from_stage = str(idx)
            rw = kv.pop("rw", kv.pop("readwrite", "false")) == "true" or typ == "cache"
            out.append(Mount(typ, resolve_path(self.workdir, target).rstrip("/") or "/",
                             id=mid or (target if typ == "cache" else ""), source=src,
                             from_stage=from_stage, rw=rw,
                             required=kv.pop("required", "false") == "true",
                             mode=kv.pop("mode", None)))
        return tuple(out)

    def do_run(self, ins: _Instr) -> None:
        mounts = self.mounts(ins)
        n = len(self.ops)
        self._do_run(ins)
        if mounts:
            self.ops[n] = dataclasses.replace(self.ops[n], mounts=mounts)

    def _do_run(self, ins: _Instr) -> None:
        loc, benv = self.loc(ins), self.build_env()
        if ins.node.json:
            # BuildKit's parser decides exec form and its argv; like Go's json.Decoder it
            # ignores text after the array (``RUN ["a", "b"] junk`` runs a b)
            self.ops.append(run_from_text(json.dumps(list(ins.node.value)), build_env=benv,
                                          location=loc,
                                          warnings=self.warnings, shell=self.shell))
            return
        command = ins.node.value[0] if ins.node.value else ""
        if not ins.heredocs:
            self.ops.append(run_from_text(command, build_env=benv, location=loc,
                                          warnings=self.warnings, shell=self.shell))
            return
        if ins.whole_heredoc:  # BuildKit: the heredoc is the script (no errexit)
            body = ins.heredocs[0].body
            if body.startswith("#!"):
                self.ops.append(Run((), shell=False, script=body, build_env=benv,
                                    location=loc, text=command))
            else:
                self.ops.append(Run((*self.shell, body), build_env=benv, location=loc,
                                    text=command))
            return
        full = command + "\n" + "".join(h.raw for h in ins.heredocs)
        self.ops.append(Run((*self.shell, full), build_env=benv, location=loc,
                            text=command))

    def do_copy(self, ins: _Instr) -> None:
        kind = Add if ins.cmd == "ADD" else Copy
        flags = self.flags(ins)
        from_stage = from_image = None
        if "from" in flags and ins.cmd == "COPY":
            ref = flags.pop("from")
            idx = self.find_stage(ref)
            if idx is not None:
                from_stage = str(idx)
            elif ref.isdigit():
                raise DefinitionError(
                    f"COPY --from={ref}: this Dockerfile has no stage {ref} above this line "
                    f"(stages are numbered from 0; {len(self.stages)} so far)",
                    location=self.loc(ins), hint="name a stage defined above, or an image")
            else:  # BuildKit: a --from that names no stage is an image reference
                known = self.known
                if not ref or (known is not None and ref not in known
                               and ref.removeprefix("tensorlake/") not in known
                               and not names_registry_image(ref)):
                    listed = ", ".join(sorted(known or ())) or "(none built yet)"
                    raise DefinitionError(
                        f"COPY --from={ref}: no stage of this Dockerfile above this line is "
                        f"called that, and it is no known image or base; known: {listed}",
                        location=self.loc(ins),
                        hint="name a stage (FROM ... AS NAME) defined above, a registered "
                             "image or a base, or a registry image with its tag "
                             "(NAME:TAG, REGISTRY/REPO:TAG)")
                from_image = ref
        inline: list[tuple[str, str]] = []
        if ins.heredocs:  # COPY <<EOF /dest: each heredoc is a file named by its delimiter
            docs = {h.name: h for h in ins.heredocs}
            words = []
            for w in ins.node.value:
                m = _HEREDOC_WORD.fullmatch(w)
                name = m.group(3).strip("'\"") if m else None
                if name in docs:
                    body = docs[name].body
                    if "'" not in w and '"' not in w:  # unquoted: variables expand
                        body = self.word(ins, body.replace("\\", "\\\\")
                                         .replace('"', '\\"').join('""'))
                    inline.append((name, body))
                    words.append(name)
                else:
                    words.append(self.word(ins, w))
        else:
            words = [self.word(ins, w) for w in ins.node.value]
        if len(words) < 2:
            raise DefinitionError(f"{ins.cmd} needs at least one source and a destination",
                                  location=self.loc(ins), hint=f"write {ins.cmd} SRC... DEST")
        if "link" in flags:
            self.warn(ins, f"{ins.cmd} --link ignored (it only changes layer caching)")
            del flags["link"]
        op = copy_op(kind, words[:-1], words[-1], flags, workdir=self.workdir,
                     location=self.loc(ins), text=ins.text)
        if inline:
            op = dataclasses.replace(op, inline=tuple(inline))
        if from_stage is not None or from_image is not None:
            op = dataclasses.replace(op, from_stage=from_stage, from_image=from_image)
        self.ops.append(op)

    def do_user(self, ins: _Instr) -> None:
        user = self.word(ins, ins.node.value[0]) if ins.node.value else ""
        if not user or user.startswith(":"):
            raise DefinitionError("USER needs a user name or id", location=self.loc(ins),
                                  hint="write USER app, USER 1000 or USER 1000:1000")
        self.ops.append(User(user, location=self.loc(ins), text=ins.text))

    def _json_or_shell(self, ins: _Instr) -> tuple[str, ...]:
        if ins.node.json:  # BuildKit's parse (text after the array is ignored, as there)
            return tuple(ins.node.value)
        return (*self.shell, ins.node.value[0] if ins.node.value else "")

    def do_shell(self, ins: _Instr) -> None:
        argv = list(ins.node.value) if ins.node.json else None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise DefinitionError("SHELL needs a JSON array, e.g. SHELL [\"/bin/bash\", \"-c\"]",
                                  location=self.loc(ins), hint="write the shell in exec form")
        self.shell = tuple(argv)

    def do_cmd(self, ins: _Instr) -> None:
        self.cmd = self._json_or_shell(ins)

    def do_entrypoint(self, ins: _Instr) -> None:
        self.entrypoint = self._json_or_shell(ins)
        self.cmd = None  # Docker: a later ENTRYPOINT resets an inherited CMD

    def do_workdir(self, ins: _Instr) -> None:
        raw = ins.node.value[0] if ins.node.value else ""
        path = self.word(ins, raw)
        if not path:
            raise DefinitionError("WORKDIR needs a path", location=self.loc(ins),
                                  hint="write WORKDIR /some/dir")
        resolved = resolve_path(self.workdir, path)
        self.workdir = resolved.rstrip("/") or "/"
        self.ops.append(Workdir(self.workdir, location=self.loc(ins), text=ins.text))

    def dispatch(self, ins: _Instr, known: frozenset[str] | None) -> None:
        cmd = ins.cmd
        if cmd not in _KNOWN:
            hint = _HINTS.get(cmd) or (
                "supported: " + " ".join(sorted(_KNOWN - WARNED)) + " (built as BuildKit "
                "does, with a warning that they change nothing at sandbox run time: "
                + " ".join(sorted(WARNED)) + "); a shell line here usually means a missing "
                "'\\' at the end of the previous line"
            )
            what = "not supported by localsbx" if cmd in _HINTS else "unknown instruction"
            raise DefinitionError(f"{what}: {ins.node.cmd}", location=self.loc(ins),
                                  hint=hint)
        if cmd == "ARG":
            return self.do_arg(ins)
        if cmd == "FROM":
            return self.do_from(ins, known)
        if self.base is None:
            raise DefinitionError(
                f"{cmd} before FROM: a Dockerfile must start with FROM <base> "
                "(only ARG may come before it)", location=self.loc(ins),
                hint="add FROM debian-minimal (or another base) as the first instruction",
            )
        if cmd == "SHELL":
            self.do_shell(ins)
            return self.warn(ins, "SHELL applies to the later build steps (as in BuildKit); "
                             "it has no effect on sandbox commands")
        if cmd in WARNED:
            return self.warn(ins, f"{cmd} ignored: it has no effect on a sandbox")
        getattr(self, "do_" + {"ADD": "copy"}.get(cmd, cmd.lower()))(ins)
        return None


def parse_dockerfile(
    path_or_text: str | os.PathLike,
    *,
    name: str | None = None,
    build_args: Mapping[str, str] | None = None,
    known_bases: Iterable[str] | None = None,
    source: str | None = None,
    target: str | None = None,
) -> ImageDefinition:
    """Read a Dockerfile into the IR.

    :param path_or_text: a path (``Path``, or a ``str`` naming an existing file and
        containing no newline) or the Dockerfile text itself.
    :param name: the image name to register; ``"default"`` (Tensorlake's) when ``None``.
    :param build_args: ``--build-arg`` values; they override ``ARG`` defaults. Values not
        declared by any ``ARG`` are reported in the warnings.
    :param known_bases: base names that exist; ``FROM`` must name one of them after
        substitution. ``None`` skips the check (the builder checks later).
    :param source: name used in messages and locations (default: the path, or
        ``<string>`` for text).
    :returns: the definition, with warnings for ignored instructions and legacy syntax.
    :raises DefinitionError: with ``file:line`` for any problem: syntax, missing or second
        ``FROM``, unknown base, unsupported instruction or flag, bad JSON/quotes/``${}``.
    """
    text, src = _read_source(path_or_text, source)
    lines = _normalise(text).split("\n")
    escape = _escape_token(lines)
    instrs = _split(lines, src, escape)
    reader = _Reader(src, escape, build_args or {})
    known = frozenset(known_bases) if known_bases is not None else None
    reader.known = known
    for ins in instrs:
        if ins.blank_continuation:
            reader.warn(ins, "empty continuation line (BuildKit: deprecated, will become an "
                        "error); remove the blank line or the '\\' before it")
        reader.dispatch(ins, known)
    if reader.base is None:
        last = max((i + 1 for i, ln in enumerate(lines) if ln.strip()), default=1)
        raise DefinitionError(
            "no FROM instruction: a Dockerfile must start with FROM <base>",
            location=SourceLocation(src, instrs[-1].line if instrs else last),
            hint="add FROM debian-minimal (or another base) as the first instruction",
        )
    reader.finish_stage()
    if target is None:
        final_i = len(reader.stages) - 1
    else:
        found = reader.find_stage(target)
        if found is None or target.isdigit():
            names = ", ".join(st["name"] for st in reader.stages if st["name"]) or "(none)"
            raise DefinitionError(f"--target {target}: no stage of that name; stages: {names}",
                                  location=SourceLocation(src, 1),
                                  hint="name the stage with FROM ... AS NAME")
        final_i = found
    final = reader.stages[final_i]
    needed: set[int] = set()
    todo = [final_i]
    while todo:  # the stages COPY --from (and RUN --mount from=) reach, transitively
        for op in reader.stages[todo.pop()]["ops"]:
            refs = [op.from_stage] if isinstance(op, Copy) else [
                m.from_stage for m in getattr(op, "mounts", ())]
            for ref in refs:
                if ref is not None and int(ref) not in needed:
                    needed.add(int(ref))
                    todo.append(int(ref))
    stages = tuple(
        Stage(str(k), reader.stages[k]["name"], ImageDefinition(
            name=f"stage-{k}", base=reader.stages[k]["base"], ops=tuple(reader.stages[k]["ops"]),
            source=src)) for k in sorted(needed))
    unused = sorted(set(reader.build_args) - reader.used_args)
    if unused:
        reader.warnings.append("build args not consumed by any ARG: " + ", ".join(unused))
    return ImageDefinition(
        name=name or "default", base=final["base"], ops=tuple(final["ops"]), source=src,
        warnings=tuple(reader.warnings), cmd=final["cmd"], entrypoint=final["entrypoint"],
        stages=stages,
    )
