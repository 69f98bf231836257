"""Docker's word processing: quote removal, escapes and ``$VAR`` substitution.

A port of the part of BuildKit's ``frontend/dockerfile/shell/lex.go`` that the Dockerfile
frontend applies to ``ENV``, ``ARG``, ``FROM``, ``WORKDIR``, ``COPY``/``ADD`` (sources,
destination, ``--chown``/``--chmod``). ``RUN`` is never processed here: the shell in the
guest does its own expansion.

Rules copied from BuildKit (``ProcessWord``):

- outside quotes the escape token (``\\`` or, with ``# escape=```, a backtick) makes the
  next character literal; an escape at the very end is dropped;
- ``'...'`` is literal (no escapes, no variables);
- ``"..."`` substitutes variables; the escape token only escapes ``"``, ``$`` and itself,
  any other escape is kept as written;
- ``$NAME``, ``${NAME}``, ``${NAME:-word}`` (unset or empty), ``${NAME-word}`` (unset),
  ``${NAME:+word}`` (set and non-empty), ``${NAME+word}`` (set), ``${NAME:?msg}`` and
  ``${NAME?msg}`` (error); ``word`` is itself processed (quotes, nested variables);
- an unset variable is the empty string; a ``$`` not followed by a name is literal;
- whitespace is kept (one instruction argument is one word).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["WordError", "process_word", "split_raw_words"]

_SPECIAL_PARAMS = "@*#?-$!0"


class WordError(ValueError):
    """A word could not be processed (unterminated quote, bad ``${...}``)."""


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.s = text
        self.i = 0
        self.env = env
        self.esc = escape

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def until(self, stop: str | None) -> str:
        """Process characters until ``stop`` (consumed) or the end of the text."""
        out: list[str] = []
        while self.i < len(self.s):
            ch = self.peek()
            if stop is not None and ch == stop:
                self.i += 1
                return "".join(out)
            if ch == self.esc:
                self.i += 1
                if self.i >= len(self.s):
                    break  # BuildKit drops an escape at the end of the word
                out.append(self.take())
            elif ch == "'":
                out.append(self.single_quoted())
            elif ch == '"':
                out.append(self.double_quoted())
            elif ch == "$":
                out.append(self.dollar())
            else:
                out.append(self.take())
        if stop is not None:
            raise WordError(f"missing '{stop}' in {self.s!r}")
        return "".join(out)

    def single_quoted(self) -> str:
        self.i += 1
        end = self.s.find("'", self.i)
        if end < 0:
            raise WordError(f"unterminated single quote in {self.s!r}")
        text = self.s[self.i:end]
        self.i = end + 1
        return text

    def double_quoted(self) -> str:
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise WordError(f"unterminated double quote in {self.s!r}")
            ch = self.peek()
            if ch == '"':
                self.i += 1
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.i += 1
            if ch == self.esc:
                nxt = self.peek()
                if nxt == "":
                    continue
                if nxt in ('"', "$", self.esc):
                    ch = self.take()
            out.append(ch)

    def name(self) -> str:
        start = self.i
        ch = self.peek()
        if ch.isdigit():
            while self.peek().isdigit():
                self.i += 1
            return self.s[start:self.i]
        if ch and ch in _SPECIAL_PARAMS:
            self.i += 1
            return ch
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.i += 1
        return self.s[start:self.i]

    def dollar(self) -> str:
        self.i += 1  # the '$'
        if self.peek() != "{":
            name = self.name()
            return self.env.get(name, "") if name else "$"
        self.i += 1
        name = self.name()
        if not name:
            raise WordError(f"bad substitution in {self.s!r}: missing variable name")
        ch = self.take()
        if ch == "}":
            return self.env.get(name, "")
        colon = ch == ":"
        if colon:
            ch = self.take()
        if ch not in ("-", "+", "?"):
            raise WordError(
                f"unsupported modifier {ch!r} in substitution of {name!r} in {self.s!r}"
                " (supported: ${VAR:-x} ${VAR-x} ${VAR:+x} ${VAR+x} ${VAR:?x} ${VAR?x})"
            )
        word = self.until("}")
        value = self.env.get(name)
        is_set = value is not None and (value != "" or not colon)
        if ch == "-":
            return value if is_set else word  # type: ignore[return-value]
        if ch == "+":
            return word if is_set else ""
        if not is_set:
            raise WordError(f"{name}: {word or 'is not allowed to be unset'}")
        return value  # type: ignore[return-value]


def process_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """Process one Dockerfile word the way BuildKit's ``ProcessWord`` does.

    :param word: the raw word as written (quotes, escapes, ``$VAR`` included).
    :param env: variables visible to the instruction (in-scope ``ARG`` values, then
        ``ENV`` values, which win).
    :param escape: the Dockerfile escape token (``\\`` or a backtick).
    :returns: the word with quotes removed, escapes applied and variables substituted.
    :raises WordError: on an unterminated quote or a malformed ``${...}``.
    """
    return _Lexer(word, env, escape).until(None)


_WS = re.compile(r"[ \t\r\n\v\f]")


def split_raw_words(text: str, escape: str = "\\") -> list[str]:
    """Split ``text`` on unquoted whitespace, keeping quotes and escapes as written.

    This is BuildKit's ``ProcessWords`` with ``RawQuotes``/``RawEscapes`` and no
    substitution, used to find heredoc markers (``<<EOF``, ``<< 'EOF'``) in a command.
    An unterminated quote simply extends to the end of the text.

    :param text: an instruction's argument text.
    :param escape: the Dockerfile escape token.
    :returns: the words, raw.
    """
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            cur.append(ch)
            if ch == escape and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch == escape and i + 1 < len(text):
            cur.extend((ch, text[i + 1]))
            i += 1
        elif ch in ("'", '"'):
            quote = ch
            cur.append(ch)
        elif _WS.match(ch):
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        words.append("".join(cur))
    return words
