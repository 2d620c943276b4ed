# Pulls an image unless the engine has it already.
# usage: sh docker_pull.sh IMAGE
docker image inspect "$1" >/dev/null 2>&1 || docker pull "$1"
