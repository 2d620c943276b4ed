# Starts the training container, detached; its init (--init: tini) passes `docker stop`'s TERM to the
# whole process group when TINI_KILL_PROCESS_GROUP is set, so the trainer checkpoints as it does outside.
# usage: sh docker_start.sh MARK RUN_DIR NAME RESUME DOCKER_RUN_OPTIONS... IMAGE   (RESUME: "" or --resume)
# Prints MARK + the container's id.
mark=$1
name=$3
resume=$4
cd "$2" || exit 1
shift 4
rm -f exit_code
docker rm -f "$name" >/dev/null 2>&1
id=$(docker run -d --rm --init --name "$name" "$@" sh bundle/run.sh $resume) && echo "$mark$id"
