# The training image with cloudtune's [train] dependencies baked in, for runs that start in seconds
# instead of installing them on every machine:
#   docker build -t YOU/cloudtune-train:0.1.0 . && docker push YOU/cloudtune-train:0.1.0
#   recipe:  compute: {image: YOU/cloudtune-train:0.1.0}
# cloudtune itself is not baked in: every run installs the wheel of the exact code that launched it.
# FROM is cloudtune's default image and requirements-train.txt is generated from pyproject.toml
# (python -m cloudtune.backends.skypilot requirements); tests check both stay in step.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
COPY requirements-train.txt /tmp/requirements-train.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/requirements-train.txt && rm /tmp/requirements-train.txt
