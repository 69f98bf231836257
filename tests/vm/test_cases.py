"""The build-side failure cases of shared/cases, built for real and checked in a sandbox.

Each case's Dockerfile (copied byte-exact into tests/cases/) is built on real QEMU and the
commands of its ``sandbox.sh`` are checked against the right values of its ``expected.txt``.
Cases that need a package index from the guest (B15 Dockerfile.url, B17, B19 line 4) are
covered elsewhere (test_network.py) or by their parse-level unit tests.
"""

from pathlib import Path

import pytest

from localsbx import Sandbox
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile

pytestmark = pytest.mark.vm
CASES = Path(__file__).parent.parent / "cases"

B15_FIND = """\
/opt d 755
/opt/bundle d 755
/opt/bundle/bin d 755
/opt/bundle/bin/tool.sh f 755
/opt/bundle/hello.txt f 644
/opt/bundle/link l 777
/opt/copied d 755
/opt/copied/bundle.tar.gz f 644
/opt/dat d 755
/opt/dat/inside.txt f 644
/opt/fake d 755
/opt/fake/fake.tar.gz f 644
/opt/gz d 755
/opt/gz/plain.txt.gz f 644
/opt/xzdir d 755
/opt/xzdir/inside-xz.txt f 644
"""

#: case -> [(command, expected stdout)]; None as stdout = only the exit code is checked
EXPECT = {
    "B01": [("cat /tmp/b01.txt", "first\nsecond\nthird\n"), ("cat /tmp/b01b.txt", "alpha\nbeta\n")],
    "B03": [("cat /tmp/b03.txt", "hello\nworld\n")],
    "B04": [("cat /tmp/b04-a.txt", "from-bash\n"), ("cat /tmp/b04-b.txt", "tab-stripped\n")],
    "B05": [("cat /etc/b05.conf",
             "home=$HOME\nWORKDIR /this/line/is/file/content/not/an/instruction\n"),
            ("pwd", "/\n")],
    "B06": [("ls /tmp | od -c | grep -c '\\\\r' || true", "0\n"),
            ("od -An -c /tmp/b06.txt | tr -s ' '", " H e l l o , w o r l d ! \\n\n"),
            ("cat /tmp/b06-plain.txt", "plain\n"),
            ("od -An -c /tmp/crlf-script.sh | head -1 | grep -c '\\\\r'", "1\n")],
    "B07": [("cat /tmp/b07.txt", "[Hello World]\n[prod]\n[quoted value]\n[it is single]\n"
                                 "[one two]\n[]\n[yes]\n[{\"a\": 1}]\n"),
            ("printenv APP_TITLE", "Hello World\n")],
    "B08": [("cat /tmp/b08.txt", "[hello big world]\n[one two two three]\n"
                                 "[one two two three]\n[/opt/a:/opt/b]\n")],
    "B10": [("cat /tmp/b10.txt", "foo=DEFAULT_FOO bar=__DEFAULT_FOO__ unset_default=fallback "
                                 "alt=present tool=[]\ntool=[1.2.3]\n"),
            ("printenv FOO || echo FOO-not-in-runtime-env", "FOO-not-in-runtime-env\n"),
            ("grep '^ID=' /etc/os-release", "ID=debian\n")],
    "B11": [("cat /tmp/b11-pwd.txt", "/srv/app/other/deep\n"),
            ("cat /tmp/b11-tilde.txt", "/~/tilde\n"), ("pwd", "/srv/app/final\n"),
            ("cat hello.txt", "hello from context\n")],
    "B13": [("cat /tmp/b13.txt", "/home/appuser/data 1234:1234 755\n"
                                 "/home/appuser/data/nested 1234:1234 755\n"
                                 "/home/appuser/data/nested/app.txt 1234:1234 644\n"
                                 "/opt/tools/run.sh 1234:1234 750\n"),
            ("/opt/tools/run.sh", "run-ok\n")],
    "B15": [("grep -E '^/opt (d)|^/opt/(bundle|copied|dat|fake|gz|xzdir)' /tmp/b15.txt", B15_FIND),
            ("/opt/bundle/bin/tool.sh", "tool-from-tar\n"),
            ("readlink /opt/bundle/link", "hello.txt\n"),
            ("test -e /opt/bundle.tar.gz || test -e /opt/dat/tarball.dat; echo $?", "1\n")],
    # BuildKit's rule (tests/diff): !**/*.py does not reopen pkg/, excluded by *
    "B16": [("cat /tmp/b16.txt", "/src/app.py\n/src/lib/util.py\n")],
}


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_case_builds_and_behaves_like_docker(base_ready, case):
    folder = CASES / case
    context = folder / "context" if (folder / "context").is_dir() else folder
    name = f"t-case-{case.lower()}"
    definition = parse_dockerfile(folder / "Dockerfile", name=name)
    build_image(definition, context_dir=context, name=name)
    with Sandbox.create(name) as sb:
        for command, want in EXPECT[case]:
            r = sb.run(command)
            assert r.exit_code == 0, f"{command}: {r.stderr}"
            assert r.stdout == want, command
