# The start of SkyPilot's run step, before skypilot_run.sh: the upload came as the task's workdir
# (~/sky_workdir, which `sky.exec` syncs to every node, unlike a file mount), and the setup runs here,
# inside the training's job, rather than as a `setup:` that only `sky.launch` runs, as a job of its own.
mkdir -p ~/cloudtune && rm -rf ~/cloudtune/upload && ln -s ~/sky_workdir ~/cloudtune/upload || exit 1
if ! bash ~/cloudtune/upload/setup.sh; then
  echo "cloudtune: the setup step failed (its output is above); the training did not start"
  exit 1
fi
