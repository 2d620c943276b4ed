# Stops (or, with GRACE "check", only looks at) the training container.
# usage: sh docker_stop.sh MARK NAME GRACE|check       prints MARK + alive|gone
# docker stop TERMs the container's init, which passes it to the whole training process group, and
# KILLs what remains after GRACE seconds.
mark=$1
name=$2
if [ "$3" != check ]; then
    docker stop -t "$3" "$name" >/dev/null 2>&1
    docker rm -f "$name" >/dev/null 2>&1
fi
if [ "$(docker inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; then
    echo "${mark}alive"
else
    echo "${mark}gone"
fi
