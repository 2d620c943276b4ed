# SkyPilot's setup step: check the upload, unpack the bundle, install this run's cloudtune wheel and
# the training's requirements. CLOUDTUNE_WHEEL comes from the task's envs.
set -e
cd ~/cloudtune
(cd upload && sha256sum --check --quiet SHA256SUMS)
rm -rf bundle && tar -xzf upload/bundle.tar.gz
python3 -m pip install --quiet --no-deps --force-reinstall "bundle/$CLOUDTUNE_WHEEL"
python3 -m pip install --quiet -r upload/requirements-train.txt
