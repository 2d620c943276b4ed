# SkyPilot's run step. The image digest is read from the registry on the machine itself, just after
# SkyPilot pulled the image; a complete checkpoint in out/ (a recovered managed job) means resume.
#
# SkyPilot appends its own steps to this script (it waits for a MOUNT_CACHED bucket to finish
# uploading, then exits with the `$?` it found), so the trainer is not exec'd, nothing here calls
# `exit` after it starts, and the last command's status is the trainer's.
cd ~/cloudtune || exit 1
python=python3
if [ -f python ]; then  # no image (Slurm): the Python the setup step chose, with this run's cloudtune in site/
  python="$(cat python)"
  export PYTHONPATH="$PWD/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${CLOUDTUNE_IMAGE_DIGEST:-}" ] && [ -n "${CLOUDTUNE_IMAGE:-}" ]; then
  digest="$(python3 -m cloudtune.registry "$CLOUDTUNE_IMAGE")" && export CLOUDTUNE_IMAGE_DIGEST="$digest"
fi
# The secrets came in the upload as a 0600 file: read once into this shell's environment (the trainer
# inherits it) and deleted, so no file on the machine holds them while it trains.
if [ -f upload/secrets.env ]; then set -a; . upload/secrets.env; set +a; rm -f upload/secrets.env; fi
resume=""
# COMPLETE: the marker cloudtune/train/checkpoint.py writes last into a finished checkpoint.
if ls out/checkpoints/step-*/COMPLETE >/dev/null 2>&1; then
  resume="--resume"
  echo "cloudtune: resuming from the newest checkpoint in out/checkpoints"
fi
# `sky cancel` (and a preemption's shutdown) send SIGTERM to this shell: it is passed on to the trainer,
# which checkpoints and stops, and this shell waits for that. SkyPilot runs this script with `bash -i`,
# which would otherwise ignore SIGTERM. A shell killed outright is noticed by the trainer's watchdog.
# Every node runs this script; the launcher (cloudtune/remote/launch.py) reads SkyPilot's node variables
# (SKYPILOT_NODE_IPS, SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE) and starts
# torchrun with node 0 as the rendezvous when there is more than one GPU, else the trainer itself.
export CLOUDTUNE_LAUNCHER_PID=$$
"$python" -u -m cloudtune.remote.launch bundle/recipe.yaml --out out $resume &
cloudtune_trainer=$!
trap 'kill -TERM "$cloudtune_trainer" 2>/dev/null' TERM INT HUP
wait "$cloudtune_trainer"
cloudtune_status=$?
while [ "$cloudtune_status" -gt 128 ] && kill -0 "$cloudtune_trainer" 2>/dev/null; do
  wait "$cloudtune_trainer"  # a signal ended the first wait, not the trainer
  cloudtune_status=$?
done
trap - TERM INT HUP
(exit "$cloudtune_status")
