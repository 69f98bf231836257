"""The DSL twin of ./Dockerfile (Tensorlake's Image names); must yield the same IR."""

from localsbx import Image

image = (
    Image(name="t-main-dsl", base_image="debian-minimal")
    .env("APP_MODE", "test")
    .env("GREETING", "hello big world")
    .workdir("/srv/app")
    .copy("data.txt", "./")
    .copy("tool.sh", "/opt/tools/bin/tool.sh", options={"chown": "1234:1234", "chmod": "0750"})
    .add("bundle.tar.gz", "/opt/")
    .run('echo "built in $(pwd) as $(id -un) mode=$APP_MODE" > /srv/app/built.txt && (sleep 300 &) && echo started-background')
    .workdir("sub")
    .run("pwd > /tmp/build-pwd.txt")
    .run('echo "shell=$0" > /tmp/b18.txt')
    .run('[ "$(readlink -f /proc/$$/exe)" = "$(readlink -f /bin/sh)" ] && echo runs-under-bin-sh >> /tmp/b18.txt')
    .run('["/bin/bash", "-c", "echo exec-form:$0 >> /tmp/b18.txt"]')
    .run('["sh", "-c", "echo literal:\'$HOME\' >> /tmp/b18.txt"]')
)
