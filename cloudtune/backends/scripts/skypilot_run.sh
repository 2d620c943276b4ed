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
resume=""
# COMPLETE: the marker cloudtune/train/checkpoint.py writes last into a finished checkpoint.
if ls out/checkpoints/step-*/COMPLETE >/dev/null 2>&1; then
  resume="--resume"
  echo "cloudtune: resuming from the newest checkpoint in out/checkpoints"
fi
# `sky cancel` (and a preemption's shutdown) send SIGTERM to this shell: it is passed on to the trainer,
# which checkpoints and stops, and this shell waits for that. SkyPilot runs this script with `bash -i`,
# which would otherwise ignore SIGTERM. A shell killed outright is noticed by the trainer's watchdog.
export CLOUDTUNE_LAUNCHER_PID=$$
"$python" -u -m cloudtune.train bundle/recipe.yaml --out out $resume &
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
