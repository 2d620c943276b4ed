#!/bin/sh
# Runs the training from inside the unpacked bundle's parent directory, whatever the machine.
# Secrets come from a 0600 file (never the command line, which `ps` shows to everyone), and the
# exit status goes to a file so a client that lost its connection can still learn how it ended.
cd "$(dirname "$0")/.." || exit 1
if [ -f secrets.env ]; then set -a; . ./secrets.env; set +a; fi
PYTHON="${CLOUDTUNE_PYTHON:-python3}"
"$PYTHON" -u -m cloudtune.train bundle/recipe.yaml --out out "$@" >> train.log 2>&1
echo $? > exit_code
