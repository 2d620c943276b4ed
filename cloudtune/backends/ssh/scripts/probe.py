"""Say which Python this is and, when it is new enough, make the run's directory under the remote root.

usage: python probe.py MARK ROOT RUN_ID MAJOR MINOR
Prints MARK + {"python", "version", "root", "run"}; "run" is null when the Python is too old. Written
for any Python (no f-strings, no annotations), so an old one can still say which version it is.
"""
import json
import os
import sys


def main(argv):
    mark, root, run_id, major, minor = argv
    root = os.path.realpath(os.path.expanduser(root))
    run = os.path.join(root, "runs", run_id)
    ok = sys.version_info >= (int(major), int(minor))
    if ok and not os.path.isdir(run):
        os.makedirs(run, 0o700)
    if ok and not os.path.isdir(os.path.join(root, "bundles")):
        os.makedirs(os.path.join(root, "bundles"))
    version = ".".join(str(part) for part in sys.version_info[:3])
    print(mark + json.dumps({"python": sys.executable, "version": version, "root": root,
                             "run": run if ok else None}))


if __name__ == "__main__":
    main(sys.argv[1:])
