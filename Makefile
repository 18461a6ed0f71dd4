# The two commands: `make run` sets everything up and trains the offline default;
# `make test` sets everything up and runs the test suite (the README's `pytest`).
# Both are idempotent: a second call skips what is installed.
#
#   make run  [WORKDIR=/tmp/ddnn]    make test  [PYTEST_ARGS='-m "not slow"']
#   make setup                        the set-up alone (VENV=.venv, PYTHON=python3)

PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= /tmp/ddnn
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# The GNU OpenMP build of oneDNN on PyPI (onednn-cpu-gomp, the library) ends at 2023.2 and
# its headers are published only from 2024.0 on (onednn-devel, installed without its
# dependencies, which would pull in the SYCL build): no matching pair exists, and the
# handlers use only API both versions share.
ONEDNN_HEADERS := onednn-devel==2024.2.0
# Debian packages: the offline default's data, and tcmalloc for faster training on CPU.
DEBIAN_PACKAGES := dataset-fashion-mnist libtcmalloc-minimal4
# oneDNN's convolutions build where the wheel exists (x86-64 Linux) and g++ compiles them.
ONEDNN := $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && command -v g++ >/dev/null && echo yes)
comma := ,
EXTRAS := $(if $(ONEDNN),test$(comma)onednn,test)
STAMP := $(VENV)/.installed-$(if $(ONEDNN),onednn,plain)

.PHONY: run test setup debian

run: setup
	$(BIN)/python -m ddnn_jax.main --config configs/default.py --workdir $(WORKDIR)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

setup: debian $(STAMP)

# Rebuilt when the package's requirements change (or the oneDNN choice does).
$(STAMP): pyproject.toml setup.cfg
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	$(if $(ONEDNN),$(BIN)/python -m pip install -q --no-deps $(ONEDNN_HEADERS))
	@echo '$(EXTRAS)' > $@
	@echo "set up $(VENV) with ddnn_jax[$(EXTRAS)]$(if $(ONEDNN),, (no oneDNN: it needs x86-64 Linux and g++))"

# apt-get where it is available (as root, else with sudo); otherwise one line saying what
# to install. Nothing is done when the packages are there.
debian:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ] || ! command -v dpkg >/dev/null; then \
	  [ -d /usr/share/datasets/fashion-mnist ] || { echo "error: Fashion-MNIST is not in /usr/share/datasets/fashion-mnist: install Debian's dataset-fashion-mnist, or put its four idx .gz files there" >&2; exit 2; }; \
	  exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	else echo "error: install the Debian packages $$missing (apt-get install $$missing, as root)" >&2; exit 2; fi; \
	echo "installing $$missing (apt-get)"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }
