# The two commands of the README:
#   make demo   create .venv, install, and run the whole pipeline (`dvc repro`) on the embedded sample
#   make test   create .venv if absent, install, and run the tests
# Both need nothing but Python 3.11 on the machine; `make install` alone builds the environment.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV)/bin)
PYTEST_ARGS ?=

# No telemetry, and no 25-second hub time-outs when a model id is not available offline.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
# The TAEF2 weights bundled beside this checkout, when present (see DESIGN.md "Codecs").
ifneq ($(wildcard ../shared/models/taef2),)
export STAGEWISE_MODELS ?= $(abspath ../shared/models)
endif
export PATH := $(BIN):$(PATH)

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	@touch $@

demo: install
	dvc repro
	@echo "Done. Manifest: data/curated/manifest.parquet; latents: data/cache/; runs/: models and previews."

test: install
	python -m pytest $(PYTEST_ARGS)

.PHONY: lock
lock: install  ## re-pin requirements.lock to what is installed in .venv now
	{ echo "# Exact versions the project is tested with (a pip constraints file). Regenerate with 'make lock'."; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable; } > requirements.lock
