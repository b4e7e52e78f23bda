# hma-gym: `make demo` and `make test` set everything up on a fresh machine (Debian + Python 3.11).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
# Mesa EGL for offscreen MuJoCo rendering (no GPU, no display)
APT_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglx-mesa0
export MUJOCO_GL ?= egl

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls a CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "mujoco==3.3.7" "robosuite==1.5.2"
	# robomimic 0.3.0 pins mujoco_py/torchvision-era deps: install it alone, use only its dataset utils
	$(PIP) install -q --no-deps "robomimic==0.3.0"
	$(PIP) install -q -e ".[dev]"
	$(PY) -c "import torch, robosuite, robomimic, hma_gym; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hma-gym demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check hma_gym training policies benchmarks tests

bench: setup
	$(PY) -m benchmarks.env_speed

clean-venv:
	rm -rf $(VENV)
