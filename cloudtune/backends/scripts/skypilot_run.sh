# SkyPilot's run step. The image digest is read from the registry on the machine itself, just after
# SkyPilot pulled the image; a checkpoint in out/ (a recovered managed job) means resume.
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
if ls -d out/checkpoints/step-* >/dev/null 2>&1; then
  resume="--resume"
  echo "cloudtune: resuming from the newest checkpoint in out/checkpoints"
fi
exec "$python" -u -m cloudtune.train bundle/recipe.yaml --out out $resume
