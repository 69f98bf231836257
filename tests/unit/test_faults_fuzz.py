"""Issue 10: property tests of the Dockerfile front end and the ``.dockerignore`` matcher.
Whatever the input, they answer or raise the project's own error (``LocalsbxError``), never
anything else. ``make test`` runs a few thousand inputs; ``make fuzz`` (``LOCALSBX_FUZZ=N``)
runs N per test (at least 100 000 there)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localsbx.definition.context import IgnoreRules
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.errors import LocalsbxError

EXAMPLES = int(os.environ.get("LOCALSBX_FUZZ") or 1500)
# make test: the same inputs every run (no flaky CI); make fuzz: new random inputs each run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("LOCALSBX_FUZZ"),
                suppress_health_check=list(HealthCheck))

INSTRUCTIONS = ["FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "ARG", "EXPOSE", "LABEL",
                "USER", "CMD", "ENTRYPOINT", "SHELL", "ONBUILD", "HEALTHCHECK", "VOLUME",
                "STOPSIGNAL", "MAINTAINER", "from", "run", "# syntax=docker/dockerfile:1",
                "# escape=`", "# escape=\\"]
PIECES = ["debian-minimal", "scratch", "$X", "${X}", "${X:-d}", "${X:+a}", "${X?err}", "${",
          "}", "\\", "`", "\n", "\\\n", "<<EOF", "<<-EOF", "<<'EOF'", "EOF", '"', "'", "[",
          "]", '["sh", "-c", "echo"]', "--chown=1:1", "--chmod=755", "--from=x", "--link",
          "--mount=type=cache,target=/x", "--network=none", "--platform=linux/amd64", "=",
          "A=1", "a b", "/app/", ".", "..", "*", "**/x", "#", " ", "\t", "\r\n", "\x00",
          "AS", "base", "http://example.invalid/x.tar", "${X/a/b}", "$$", "&&", "|", ";"]

words = st.one_of(st.sampled_from(PIECES), st.text(max_size=12))
lines = st.builds(lambda ins, args: ins + " " + " ".join(args),
                  st.sampled_from(INSTRUCTIONS), st.lists(words, max_size=6))
dockerfiles = st.one_of(
    st.lists(lines, max_size=8).map(lambda ls: "FROM debian-minimal\n" + "\n".join(ls)),
    st.lists(lines, max_size=8).map("\n".join),
    st.text(max_size=200),
)
build_args = st.dictionaries(st.sampled_from(["X", "A", "HTTP_PROXY", "B"]),
                             st.text(max_size=8), max_size=3)


@FUZZ
@given(dockerfiles, build_args)
def test_dockerfile_front_end_raises_only_its_own_errors(text, args):
    try:
        parse_dockerfile(text + "\n", source="<fuzz>", build_args=args,
                         known_bases=["debian-minimal", "base"])
    except LocalsbxError:
        pass


segments = st.one_of(st.sampled_from(["a", "b", "dir", ".git", "x.py", "*", "**", "?", "[a-z]",
                                      "[!a]", "[", "]", "\\", "!", ".", "..", "", " "]),
                     st.text(max_size=6))
patterns = st.lists(segments, min_size=1, max_size=4).map("/".join).map(
    lambda p: p if not p.startswith("x") else "!" + p)
rel_paths = st.lists(st.one_of(st.sampled_from(["a", "b", "dir", ".git", "x.py", "sub"]),
                               st.text(min_size=1, max_size=6).filter(lambda s: "/" not in s)),
                     min_size=1, max_size=4).map("/".join)


@FUZZ
@given(st.lists(st.one_of(patterns, st.text(max_size=20)), max_size=6), rel_paths)
def test_dockerignore_matcher_raises_only_its_own_errors(rules, rel):
    try:
        ignore = IgnoreRules(rules)
        first = ignore.excluded(rel)
        assert ignore.excluded(rel) == first  # deterministic
    except LocalsbxError:
        pass


plain = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1,
                         max_size=6), min_size=1, max_size=4).map("/".join)


@FUZZ
@given(plain, plain)
def test_a_literal_pattern_excludes_that_path_and_what_is_under_it(path, below):
    ignore = IgnoreRules([path])
    assert ignore.excluded(path)
    assert ignore.excluded(f"{path}/{below}")
    assert not IgnoreRules([path, f"!{path}"]).excluded(path)


def test_found_by_fuzzing_non_ascii_space_is_a_located_error():
    import pytest

    from localsbx.errors import DefinitionError

    with pytest.raises(DefinitionError, match="non-ASCII") as ei:
        parse_dockerfile("FROM debian-minimal\nHEALTHCHECK 0\xa00\n", source="<t>")
    assert ei.value.location.line == 2


def test_found_by_fuzzing_empty_continuation_line_is_not_an_instruction():
    d = parse_dockerfile("FROM debian-minimal\nRUN true\n \\\n\n", source="<t>")
    assert len(d.ops) == 1


def test_found_by_fuzzing_split_character_before_another_syntax_error():
    import pytest

    from localsbx.errors import DefinitionError

    with pytest.raises(DefinitionError, match="non-ASCII") as ei:
        parse_dockerfile("FROM debian-minimal\nHEALTHCHECK 0\x850\nENV debian-minimal\n",
                         source="<t>")
    assert ei.value.location.line == 2


def test_found_by_fuzzing_text_after_an_exec_form_array_is_ignored_as_buildkit_does():
    from localsbx.definition.dockerfile import Run

    d = parse_dockerfile('FROM debian-minimal\nCMD ["sh", "-c", "echo"] debian-minimal\n'
                         'RUN ["mkdir", "/x"] junk\nSHELL ["/bin/bash", "-c"] more\n',
                         source="<t>")
    [run] = [op for op in d.ops if isinstance(op, Run)]
    assert run.argv == ("mkdir", "/x")
    assert d.cmd == ("sh", "-c", "echo")
