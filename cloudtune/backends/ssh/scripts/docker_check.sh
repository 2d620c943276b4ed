# Whether Docker answers for this user, the user's ids (the container runs as them) and whether there are GPUs.
# usage: sh docker_check.sh MARK
# Prints MARK + "docker VERSION" (or Docker's own complaint), MARK + "user UID:GID", MARK + gpus.
mark=$1
if out=$(docker version --format '{{.Server.Version}}' 2>&1); then echo "${mark}docker $out"; else echo "$out"; fi
echo "${mark}user $(id -u):$(id -g)"
if command -v nvidia-smi >/dev/null 2>&1; then echo "${mark}gpus"; fi
