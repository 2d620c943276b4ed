# cloudtune: `make demo` trains a tiny model offline; `make test` runs the test suite.
# Both set everything up themselves on a fresh machine (Python 3.11, Debian).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO_DIR := demo-out

.PHONY: setup demo test test-slurm lint clean system-packages

setup: $(STAMP)

# Installs torch 2.13.0 FIRST: that exact release is on this machine's disk as a CPU build, and
# any other spec (or resolving it through another package) downloads GBs of CUDA wheels.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# sshd for the SSH backend's tests, a Docker engine for its Docker mode, rsync for SkyPilot's local dry runs;
# munge, slurmctld, slurmd and patchelf for the one-node Slurm the real SkyPilot client launches on
# (tests/slurm_cluster.py); chromium renders `cloudtune report`'s page in its test (tests/chromium.py).
system-packages:
	@if ! command -v sshd >/dev/null 2>&1 && ! test -x /usr/sbin/sshd || ! command -v rsync >/dev/null 2>&1 \
			|| ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then \
		echo "installing openssh-server, rsync and docker.io with apt"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client \
			rsync docker.io >/dev/null; \
	fi
	@if ! test -x /usr/sbin/slurmctld || ! test -x /usr/sbin/slurmd || ! command -v sinfo >/dev/null 2>&1 \
			|| ! test -x /usr/sbin/munged || ! command -v patchelf >/dev/null 2>&1; then \
		echo "installing slurmctld, slurmd, slurm-client, munge and patchelf with apt"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			slurmctld slurmd slurm-client munge patchelf >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing chromium with apt"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null; \
	fi

demo: setup
	@rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(BIN)/cloudtune init --template demo-tiny recipe.yaml
	cd $(DEMO_DIR) && ../$(BIN)/cloudtune validate recipe.yaml
	cd $(DEMO_DIR) && ../$(BIN)/cloudtune run --backend local recipe.yaml
	$(BIN)/python -m cloudtune.train.verify $$(ls -d $(DEMO_DIR)/outputs/demo-tiny/*/ | tail -n 1)

test: setup
	$(BIN)/python -m pytest -q

# The real-SkyPilot launches on the localhost Slurm (tests/slurm_cluster.py) alone; `make test` runs them too.
test-slurm: setup
	$(BIN)/python -m pytest -q tests/test_skypilot_slurm.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
