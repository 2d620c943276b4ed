# Finds the interpreter and lets it make the run directory, in one round trip.
# usage: sh probe.sh MARK PYTHON PROBE_PY_SOURCE ROOT RUN_ID MAJOR MINOR   (PYTHON may be empty: the PATH's)
mark=$1
py=$2
code=$3
shift 3
if [ -z "$py" ]; then py=$(command -v python3 || command -v python); fi
if [ -z "$py" ] || ! command -v "$py" >/dev/null 2>&1; then
    echo "${mark}no-python"
    exit 0
fi
exec "$py" -c "$code" "$mark" "$@"
