#!/bin/sh
# Prints the greeting, and the name given as $1 if any.
echo "$APP_GREETING${1:+, $1}"
