"""The build context: ``.dockerignore``, COPY/ADD sources, and the tar stream the guest unpacks.

Usage::

    ctx = BuildContext(Path("app"))
    key = defn.digest(ctx.digest(*[op for op in defn.ops if isinstance(op, Copy)]))
    data = ctx.make_tar(op, passwd=guest_passwd_text, group=guest_group_text)
    # guest: tar -C / -xpf - --same-owner --numeric-owner --no-overwrite-dir

What is copied from Docker/BuildKit:

- ``.dockerignore`` at the context root (moby ``patternmatcher``): lines in order, ``#``
  comments, ``!`` re-includes, the **last** matching line wins, a pattern matching a parent
  directory matches everything under it, ``*``/``?``/``[...]`` stay within one path
  component, ``**`` spans any number of components. As BuildKit's walker, an excluded
  folder is entered only when an exception's text starts with its path, so ``!**/*.py``
  does **not** re-include ``pkg/deep/mod.py`` once ``*`` excluded ``pkg`` (BuildKit wins
  over the documented rule, docker/cli#2919; B16; checked by tests/diff).
  ``.dockerignore`` is shipped unless a pattern excludes it (B16's ``*`` does). Excluded
  files do not exist for COPY/ADD. A wildcard source matching nothing copies nothing
  (BuildKit), a named source that is missing is an error.
- sources are relative to the context root (a leading ``/`` is ignored), may be globs
  (Go ``filepath.Match``: ``*`` also matches dotfiles), must not leave the context; a
  directory copies its **contents**; a file goes to ``dest`` itself unless ``dest`` ends in
  ``/``, several files were given or matched, or ``dest`` is an existing directory in the
  image (``dest_is_dir``).
- owners are 0:0 unless ``--chown`` (resolved in the image's ``/etc/passwd``/``/etc/group``;
  ``user`` alone takes the user's primary group, a numeric uid alone the same number as
  gid); modes are kept unless ``--chmod``; symlinks stay symlinks; contents are byte-exact.
- every parent directory of a destination is in the stream (0755, the ``--chown`` owner,
  B13); ``--no-overwrite-dir`` keeps the metadata of directories that already exist.
- ``ADD``: a local file that is a tar archive by **content** (plain, gzip, bzip2, xz) is
  extracted into ``dest``; entries keep their modes and the archive's numeric uid/gid
  (Docker's ``UntarPath`` does not re-own them) unless ``--chown`` is given, which then owns
  every extracted entry. Anything else is copied as is (``plain.txt.gz`` stays a file).
  ``http(s)://`` sources are downloaded on the host (timeout 60 s), never extracted, mode
  0600.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from localsbx.definition.ops import Add, Copy
from localsbx.errors import DefinitionError, ImageBuildError

__all__ = ["BuildContext", "IgnoreRules", "parse_chown", "DOWNLOAD_TIMEOUT"]

#: Seconds to wait for an ``ADD <url>`` download (connect and each read).
DOWNLOAD_TIMEOUT = 60.0
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile one cleaned ``.dockerignore`` pattern (moby patternmatcher rules)."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":  # "**/" = zero or more directories
                    out.append("(?:.*/)?")
                    i += 1
                    continue
                out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                neg = body.startswith(("!", "^"))
                if neg:
                    body = body[1:]
                # every member literal but range dashes (no nested sets, `&&`, `~~`)
                body = "".join(c if c == "-" else re.escape(c) for c in body)
                out.append("[" + ("^" if neg else "") + body + "]")
                i = end
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    out.append("$")
    try:
        return re.compile("".join(out), re.S)
    except re.error as exc:  # e.g. "[]" or "[z-a]": Go's matcher refuses them too
        raise DefinitionError(
            f"invalid pattern {pattern!r}: bad character class ({exc.msg})",
            hint="a '[' opens a class that needs members and a closing ']' (ranges low-high); "
                 "write '\\[' for a literal bracket") from None


class IgnoreRules:
    """Docker ``.dockerignore`` rules.

    :param lines: the file's lines.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.patterns: list[tuple[bool, str, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            line = posixpath.normpath(line.lstrip("/")) if line.strip("/") else "."
            if line == ".":
                continue  # Docker ignores a pattern that cleans to "."
            self.patterns.append((exclusion, line, _pattern_regex(line)))

    @classmethod
    def from_file(cls, path: Path) -> IgnoreRules:
        """Read ``path``; a missing file means no rules."""
        try:
            return cls(path.read_text(encoding="utf-8", errors="replace").splitlines())
        except FileNotFoundError:
            return cls(())
        except DefinitionError as exc:
            raise DefinitionError(f"{path}: {exc.message}", hint=exc.hint) from None

    def excluded(self, rel: str) -> bool:
        """Whether context-relative ``rel`` (``/``-separated) is excluded: the last
        matching pattern decides, a pattern also matches when it matches a parent."""
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = False
        for exclusion, _text, rx in self.patterns:
            if exclusion != matched:
                continue  # cannot change the verdict
            if any(rx.match(c) for c in candidates):
                matched = not exclusion
        return matched

    def may_reinclude_under(self, rel: str) -> bool:
        """Whether an exception (``!pattern``) could re-include something under the excluded
        folder ``rel``: BuildKit (fsutil) descends into an excluded folder only when an
        exception's text starts with the folder's path, so ``!**/*.py`` does not re-include
        files under a folder that ``*`` excluded (moby's long-standing rule, docker/docs#25850)."""
        return any(exc and (text + "/").startswith(rel + "/")
                   for exc, text, _rx in self.patterns)


# --------------------------------------------------------------------------- ownership


def _table(text: str, fields: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= fields and parts[0] and not line.startswith("#"):
            out.setdefault(parts[0], parts)
    return out


def parse_chown(chown: str | None, passwd: str, group: str) -> tuple[int, int]:
    """Resolve ``--chown`` the way Docker does, against the IMAGE's files.

    :param chown: ``user[:group]``; names or numeric ids; ``None`` means root.
    :param passwd: text of the image's ``/etc/passwd``.
    :param group: text of the image's ``/etc/group``.
    :returns: ``(uid, gid)``. ``user`` alone: the user's primary gid (names) or the same
        number (numeric uid).
    :raises KeyError: naming the user or group that the image does not have.
    """
    if not chown:
        return 0, 0
    user, _, grp = chown.partition(":")
    if user.isdigit():
        uid, primary = int(user), int(user)
    else:
        entry = _table(passwd, 4).get(user)
        if entry is None:
            raise KeyError(f"user {user!r}")
        uid, primary = int(entry[2]), int(entry[3])
    if not grp:
        return uid, primary
    if grp.isdigit():
        return uid, int(grp)
    gentry = _table(group, 3).get(grp)
    if gentry is None:
        raise KeyError(f"group {grp!r}")
    return uid, int(gentry[2])


# --------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class _Item:
    """One tar entry to write: absolute target path and where its content comes from."""

    target: str  # absolute path in the image
    kind: str  # "dir" | "file" | "symlink" | "member" | "bytes"
    path: Path | None = None  # host file (file/dir/symlink)
    mode: int = 0o755
    data: bytes = b""  # for "bytes" (downloads)
    member: tarfile.TarInfo | None = None  # for "member" (ADD archive entries)
    archive: Path | None = None


def _special_type(st: os.stat_result) -> bytes | None:
    """The tar type of a FIFO or a device node, else ``None``. Such entries are sent as tar
    headers only, never opened or read (a FIFO would block, ``/dev/zero`` never ends), as
    BuildKit does; the build VM's tar recreates them (mknod)."""
    if stat.S_ISFIFO(st.st_mode):
        return tarfile.FIFOTYPE
    if stat.S_ISCHR(st.st_mode):
        return tarfile.CHRTYPE
    if stat.S_ISBLK(st.st_mode):
        return tarfile.BLKTYPE
    return None


def _is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive (plain/gzip/bzip2/xz), by content."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # never open a FIFO or a device
            return False
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is not None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False


class BuildContext:
    """A build context directory (``docker build <dir>``).

    :param root: the context directory; ``None`` is an empty context (every COPY fails).
    """

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.ignore = IgnoreRules.from_file(self.root / ".dockerignore") if self.root else (
            IgnoreRules(()))
        self._index: dict[str, str] | None = None
        self._downloads: dict[str, tuple[bytes, str]] = {}

    def download(self, op: Copy, url: str) -> tuple[bytes, str]:
        """``ADD <url>``'s body and file name, fetched on the host once per context: the
        step key (:meth:`digest`) and the copy (:meth:`make_tar`) see the same bytes.

        :raises ImageBuildError: the download failed (names the URL and the step).
        """
        if url not in self._downloads:
            self._downloads[url] = _download(op, url)
        return self._downloads[url]

    # -- what is in the context

    def index(self) -> dict[str, str]:
        """Every visible path (relative, ``/``-separated) -> ``"dir"|"file"|"symlink"``.

        A directory is visible if it is not excluded or holds a visible path. ``"file"``
        includes FIFOs and device nodes (copied as such, never read); sockets are left out,
        as Docker's and BuildKit's context tar writers do (a socket cannot be archived).
        """
        if self._index is not None:
            return self._index
        found: dict[str, str] = {}
        if self.root is not None and self.root.is_dir():
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                base = Path(dirpath).relative_to(self.root).as_posix()
                prefix = "" if base == "." else base + "/"
                for name in sorted(filenames) + [d for d in dirnames
                                                 if os.path.islink(os.path.join(dirpath, d))]:
                    rel = prefix + name
                    if not self.ignore.excluded(rel):
                        full = os.path.join(dirpath, name)
                        try:
                            mode = os.lstat(full).st_mode
                        except OSError:  # removed while we looked
                            continue
                        if stat.S_ISSOCK(mode):
                            continue
                        found[rel] = "symlink" if stat.S_ISLNK(mode) else "file"
                dirnames[:] = [d for d in dirnames
                               if not os.path.islink(os.path.join(dirpath, d))
                               and (not self.ignore.excluded(prefix + d)
                                    or self.ignore.may_reinclude_under(prefix + d))]
                if prefix and not self.ignore.excluded(base):
                    found[base] = "dir"
        for rel in list(found):  # parents of visible entries are visible
            parts = rel.split("/")
            for i in range(1, len(parts)):
                found.setdefault("/".join(parts[:i]), "dir")
        self._index = dict(sorted(found.items()))
        return self._index

    def _error(self, op: Copy, message: str, hint: str) -> DefinitionError:
        return DefinitionError(message, location=op.location, hint=hint)

    def resolve(self, op: Copy) -> list[tuple[str, str]]:
        """Resolve the op's sources, Docker style.

        :param op: a ``Copy``/``Add``.
        :returns: ``[(kind, rel)]`` with kind ``"url"`` (rel is the URL), ``"dir"``,
            ``"file"`` or ``"symlink"``; ``rel`` ``"."`` is the whole context.
        :raises DefinitionError: a source is missing (or excluded), matches nothing, leaves
            the context, or is a URL in ``COPY``.
        """
        name = type(op).__name__.upper()
        out: list[tuple[str, str]] = []
        index = self.index()
        where = str(self.root) if self.root else "(no build context)"
        for src in op.sources:
            if re.match(r"^https?://", src, re.I):
                if not isinstance(op, Add):
                    raise self._error(op, f"COPY cannot fetch {src}",
                                      "use ADD for URLs, or download in a RUN step")
                out.append(("url", src))
                continue
            rel = posixpath.normpath(src.lstrip("/") or ".")
            if rel == ".." or rel.startswith("../"):
                raise self._error(op, f"{name} source {src!r} is outside the build context "
                                  f"{where}", "sources are relative to the context "
                                  "directory; move the file into it or pick a wider context")
            if _GLOB_CHARS.search(rel):
                try:
                    rx = _pattern_regex(rel)
                except DefinitionError as exc:
                    raise self._error(op, f"{name} source {src!r}: {exc.message}",
                                      exc.hint) from None
                hits = [(k, r) for r, k in index.items() if rx.match(r)]
                # BuildKit (AllowEmptyWildcard): a pattern matching nothing copies nothing
                out.extend(hits)
                continue
            kind = "dir" if rel == "." and self.root else index.get(rel)
            if kind is None and self.root is not None and "/" in rel:
                # a path through an in-context symlinked folder (``self/self/``): BuildKit
                # follows it; name what it points at
                target = self._follow(op, src, rel, where)
                if target is not None:
                    trel = target.relative_to(self.root).as_posix()
                    kind = "dir" if trel == "." else index.get(trel)
                    if kind is not None:
                        rel = trel
            if kind == "symlink":  # a named source is followed, as Docker does
                target = self._follow(op, src, rel, where)
                if target is None:
                    raise self._error(op, f"{name} source {src!r} is a dangling symlink "
                                      f"({os.readlink(self.root / rel)!r} does not exist) in "
                                      f"the build context {where}",
                                      "fix the link or copy its target")
                kind = "dir" if target.is_dir() else "file"
            if kind is None:
                raise self._error(
                    op, f"{name} source {src!r} not found in the build context {where}",
                    "check the path (relative to the context directory) and that "
                    ".dockerignore does not exclude it; pass the right context directory",
                )
            out.append((kind, rel))
        return out

    def _follow(self, op: Copy, src: str, rel: str, where: str) -> Path | None:
        """Where ``rel`` leads with its symlinks followed, inside the context; ``None`` if
        it leads nowhere.

        :raises DefinitionError: a symlink loop, or a link leaving the context.
        """
        name = type(op).__name__.upper()
        try:
            target = (self.root / rel).resolve(strict=True)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return None  # missing, or through a file (ENOTDIR)
            raise self._error(op, f"{name} source {src!r}: symlink loop in the build "
                              f"context {where} ({exc})", "fix or remove the link") from None
        except RuntimeError as exc:  # Python < 3.13 reports a loop this way
            raise self._error(op, f"{name} source {src!r}: symlink loop in the build "
                              f"context {where} ({exc})", "fix or remove the link") from None
        if not target.is_relative_to(self.root):
            raise self._error(op, f"{name} source {src!r} is a symlink leaving the "
                              f"build context {where}", "copy the target instead")
        return target

    def _walk(self, rel: str) -> list[tuple[str, str]]:
        """Visible entries under directory ``rel``: ``[(relative-to-rel, kind)]``."""
        index = self.index()
        if rel == ".":
            return [(r, k) for r, k in index.items()]
        prefix = rel + "/"
        return [(r[len(prefix):], k) for r, k in index.items() if r.startswith(prefix)]

    # -- digest

    def digest(self, *items: Copy | str | Iterable[Copy | str]) -> str:
        """SHA-256 over what the given ops (or source strings) read: paths, types, modes,
        link targets and file contents (not mtimes). An ``ADD <url>`` counts by the body it
        downloads now and its file name, as BuildKit's HTTP source keys its cache by the
        content's checksum: a changed remote file reruns the step, offline it fails.

        :param items: ``Copy``/``Add`` ops or source strings, or iterables of them.
        :returns: hex digest (``ImageDefinition.digest(context_digest=...)``).
        :raises DefinitionError: a source is missing (see :meth:`resolve`).
        """
        flat: list[Copy | str] = []
        for item in items:
            if isinstance(item, (Copy, str)):
                flat.append(item)
            else:
                flat.extend(item)
        h = hashlib.sha256()
        for item in flat:
            op = item if isinstance(item, Copy) else Add((item,), "/")
            h.update(b"op\0" + type(op).__name__.encode() + b"\0")
            for kind, rel in self.resolve(op):
                h.update(f"{kind}\0{rel}\0".encode())
                if kind == "url":
                    data, fname = self.download(op, rel)
                    h.update(f"{fname}\0".encode() + hashlib.sha256(data).digest())
                    continue
                entries = self._walk(rel) if kind == "dir" else [("", kind)]
                for sub, k in entries:
                    path = self.root / rel / sub if sub else self.root / rel
                    st = path.lstat() if k == "symlink" else path.stat()
                    h.update(f"{sub}\0{k}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
                    if k == "symlink":
                        h.update(os.readlink(path).encode() + b"\0")
                    elif k == "file" and _special_type(st):  # a FIFO or device: never read
                        h.update(f"special\0{stat.S_IFMT(st.st_mode):o}\0{st.st_rdev}\0"
                                 .encode())
                    elif k == "file":
                        with open(path, "rb") as f:
                            for chunk in iter(lambda: f.read(1 << 20), b""):
                                h.update(chunk)
        return h.hexdigest()

    # -- the tar stream

    def _items(self, op: Copy, dest_is_dir: bool) -> list[_Item]:
        resolved = self.resolve(op)
        dest = op.dest
        base = dest.rstrip("/") or "/"
        to_dir = dest.endswith("/") or dest_is_dir or len(resolved) > 1
        items: list[_Item] = []
        for kind, rel in resolved:
            if kind == "url":
                data, fname = self.download(op, rel)
                target = posixpath.join(base, fname) if to_dir else base
                items.append(_Item(target, "bytes", data=data, mode=0o600))
                continue
            path = self.root / rel if rel != "." else self.root
            if kind == "dir":
                for sub, k in self._walk(rel):
                    p = path / sub
                    items.append(_Item(posixpath.join(base, sub), k, p,
                                       stat.S_IMODE(p.lstat().st_mode)))
                continue
            if isinstance(op, Add) and _is_tar(path):
                items.extend(_archive_items(op, path, base))
                continue
            target = posixpath.join(base, posixpath.basename(rel)) if to_dir else base
            st = path.lstat() if kind == "symlink" else path.stat()
            items.append(_Item(target, "symlink" if kind == "symlink" else "file",
                               path, stat.S_IMODE(st.st_mode)))
        return items

    def write_tar(
        self, op: Copy, fileobj: BinaryIO, *, passwd: str, group: str,
        dest_is_dir: bool = False, keep_owners: bool = False,
    ) -> None:
        """Write the op's tar stream (paths relative to ``/``) to ``fileobj``.

        :param op: the ``Copy``/``Add``.
        :param fileobj: writable binary file.
        :param passwd: text of the image's ``/etc/passwd`` (for ``--chown`` names).
        :param group: text of the image's ``/etc/group``.
        :param dest_is_dir: ``dest`` (without ``/``) is an existing directory in the image,
            so a single file goes inside it (Docker); the builder finds out with ``test -d``.
        :param keep_owners: without ``--chown``, files keep their owners in this tree
            (``COPY --from`` a stage, as BuildKit) instead of 0:0 (the build context).
        :raises DefinitionError: bad source (see :meth:`resolve`), ``--chown`` naming an
            unknown user/group, an archive member leaving ``dest``.
        :raises ImageBuildError: an ``ADD`` URL could not be downloaded.
        """
        try:
            uid, gid = parse_chown(op.chown, passwd, group)
        except KeyError as exc:
            raise DefinitionError(
                f"--chown={op.chown}: the image has no {exc.args[0]}", location=op.location,
                hint="create it in an earlier RUN step (groupadd/useradd) or use numeric ids",
            ) from None
        chmod = int(op.chmod, 8) if op.chmod else None
        items = self._items(op, dest_is_dir)
        produced = {it.target for it in items}
        parents: set[str] = set()
        for it in items:
            d = posixpath.dirname(it.target)
            while d not in ("/", "") and d not in produced:
                parents.add(d)
                d = posixpath.dirname(d)
        now = int(time.time())
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT) as tf:
            for d in sorted(parents):
                tf.addfile(_info(d, tarfile.DIRTYPE, 0o755, uid, gid, now))
            for it in items:
                if keep_owners and op.chown is None and it.path is not None:
                    st = it.path.lstat()
                    uid, gid = st.st_uid, st.st_gid
                _write_item(tf, it, uid, gid, chmod, op.chown is not None, now)

    def make_tar(
        self, op: Copy, *, passwd: str, group: str, dest_is_dir: bool = False,
        keep_owners: bool = False,
    ) -> bytes:
        """:meth:`write_tar` into memory; returns the tar bytes."""
        buf = io.BytesIO()
        self.write_tar(op, buf, passwd=passwd, group=group, dest_is_dir=dest_is_dir,
                       keep_owners=keep_owners)
        return buf.getvalue()


def _info(target: str, typ: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(target.lstrip("/"))
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = typ, mode, uid, gid, mtime
    ti.uname = ti.gname = ""
    return ti


def _write_item(tf: tarfile.TarFile, it: _Item, uid: int, gid: int, chmod: int | None,
                chowned: bool, now: int) -> None:
    if it.kind == "member":
        m = it.member
        # BuildKit: ADD --chown does not apply to the members of an extracted archive
        ti = _info(it.target, m.type, m.mode, m.uid, m.gid, int(m.mtime))
        if chmod is not None and not m.issym():
            ti.mode = chmod
        ti.linkname = m.linkname
        if m.islnk():  # hard links point inside the same destination
            ti.linkname = it.data.decode().lstrip("/")
        ti.size = m.size if m.isreg() else 0
        ti.devmajor, ti.devminor = m.devmajor, m.devminor
        if m.isreg():
            with tarfile.open(it.archive, "r:*") as src:
                tf.addfile(ti, src.extractfile(m.name))
        else:
            tf.addfile(ti)
        return
    if it.kind == "bytes":
        ti = _info(it.target, tarfile.REGTYPE, chmod or it.mode, uid, gid, now)
        ti.size = len(it.data)
        tf.addfile(ti, io.BytesIO(it.data))
        return
    st = it.path.lstat() if it.kind == "symlink" else it.path.stat()
    mtime = int(st.st_mtime)
    if it.kind == "symlink":
        ti = _info(it.target, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
        ti.linkname = os.readlink(it.path)
        tf.addfile(ti)
    elif it.kind == "dir":
        tf.addfile(_info(it.target, tarfile.DIRTYPE, chmod or it.mode, uid, gid, mtime))
    elif (special := _special_type(st)) is not None:
        ti = _info(it.target, special, chmod or it.mode, uid, gid, mtime)
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        tf.addfile(ti)
    else:
        ti = _info(it.target, tarfile.REGTYPE, chmod or it.mode, uid, gid, mtime)
        ti.size = st.st_size
        with open(it.path, "rb") as f:
            tf.addfile(ti, f)


def _archive_items(op: Copy, archive: Path, base: str) -> list[_Item]:
    """The entries of a local tar archive, placed under ``base`` (ADD extraction)."""
    items = []
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            name = posixpath.normpath(m.name.lstrip("/"))
            if name == ".":
                continue
            if name == ".." or name.startswith("../"):
                raise DefinitionError(
                    f"ADD {archive.name}: archive member {m.name!r} leaves the destination",
                    location=op.location, hint="repack the archive with relative paths",
                )
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.ischr()
                    or m.isblk() or m.isfifo()):
                continue
            link = b""
            if m.islnk():
                link = posixpath.join(base, posixpath.normpath(m.linkname.lstrip("/"))).encode()
            items.append(_Item(posixpath.join(base, name), "member", mode=m.mode, member=m,
                               archive=archive, data=link))
    return items


def _download(op: Copy, url: str) -> tuple[bytes, str]:
    """Fetch ``url`` on the host; returns ``(content, file name)``."""
    fname = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not fname and not op.dest.endswith("/"):
        fname = "index.html"
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "localsbx"})
        with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        where = f"{op.location}: " if op.location is not None else ""
        why = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
               else getattr(exc, "reason", None) or exc)
        raise ImageBuildError(
            f"{where}ADD could not download {url}: {why}",
            step=op.describe(),
            hint="check the URL and the host's network, or put the file in the build context",
        ) from exc
    return data, fname or "index.html"
