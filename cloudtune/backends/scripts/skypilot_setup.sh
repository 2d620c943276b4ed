# SkyPilot's setup step: check the upload, unpack the bundle, install this run's cloudtune wheel and
# the training's requirements. CLOUDTUNE_WHEEL comes from the task's envs; CLOUDTUNE_PYTHON too where no
# image runs (Slurm), with CLOUDTUNE_VENV_KEY naming the venv for what that Python lacks.
set -e
cd ~/cloudtune
(cd upload && sha256sum --check --quiet SHA256SUMS)
rm -rf bundle && tar -xzf upload/bundle.tar.gz
if [ -n "${CLOUDTUNE_PYTHON:-}" ]; then
  python="$CLOUDTUNE_PYTHON"
  needed="$("$python" -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read().splitlines()))' \
    upload/requirements-train.txt)"
  missing="$("$python" upload/missing_requirements.py "$needed")"
  if [ "$missing" != "[]" ]; then
    # SkyPilot's HOME here is one per cluster; the login user's own home keeps the venv for later runs.
    login_home="$(getent passwd "$(id -un)" | cut -d: -f6)"
    venv="${CLOUDTUNE_REMOTE_ROOT:-$login_home/.cloudtune/remote}/envs/$CLOUDTUNE_VENV_KEY"
    echo "cloudtune: $python lacks $missing; using the venv $venv (built once, reused by later runs)"
    python="$("$python" upload/make_venv.py CLOUDTUNE: "$venv" "$needed" | sed -n 's/^CLOUDTUNE://p' | tail -n 1)"
  fi
  # This run's cloudtune beside the Python's own packages, never into them: runs of other versions share it.
  rm -rf site && "$python" -m pip install --quiet --no-deps --no-index --target site "bundle/$CLOUDTUNE_WHEEL"
  echo "$python" > python
else
  python3 -m pip install --quiet --no-deps --force-reinstall "bundle/$CLOUDTUNE_WHEEL"
  python3 -m pip install --quiet -r upload/requirements-train.txt
fi
