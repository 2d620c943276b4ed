# Starts the training in its own session (setsid), detached, so losing the connection loses nothing.
# usage: sh start_detached.sh MARK RUN_DIR [run.sh ARGS...]     (the environment reaches run.sh as is)
# Prints MARK + the pid, which is the process group's id: not being a group leader, the shell's
# background child made its own session without forking again.
mark=$1
cd "$2" || exit 1
shift 2
rm -f exit_code
command -v setsid >/dev/null 2>&1 || { echo 'setsid (util-linux) is missing'; exit 3; }
setsid nohup sh bundle/run.sh "$@" </dev/null >/dev/null 2>&1 &
echo $! > pid
echo "$mark$!"
