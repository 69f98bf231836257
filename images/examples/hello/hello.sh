#!/bin/sh
echo "$GREETING"
echo "cwd: $(pwd), user: $(id -un)"
cat /app/build-info.txt
echo "asset: $(cat /opt/assets/motd.txt)"
