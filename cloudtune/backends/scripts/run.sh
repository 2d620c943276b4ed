#!/bin/sh
# Runs the training from inside the unpacked bundle's parent directory, whatever the machine.
# Secrets come from a 0600 file (never the command line, which `ps` shows to everyone), and the
# exit status goes to a file so a client that lost its connection can still learn how it ended.
cd "$(dirname "$0")/.." || exit 1
if [ -f secrets.env ]; then set -a; . ./secrets.env; set +a; fi
PYTHON="${CLOUDTUNE_PYTHON:-python3}"
# The trainer stops when its launcher is gone (cloudtune/remote/watchdog.py): the CLI where the local
# backend names it, else this script, so a training whose wrapper was killed does not run on unwatched.
export CLOUDTUNE_LAUNCHER_PID="${CLOUDTUNE_LAUNCHER_PID:-$$}"
# The launcher (cloudtune/remote/launch.py) starts one trainer process, or torchrun for several GPUs.
"$PYTHON" -u -m cloudtune.remote.launch bundle/recipe.yaml --out out "$@" >> train.log 2>&1
echo $? > exit_code
