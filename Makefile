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

# The embedded sample is an input folder like a user's (params.yaml data.domains), not a DVC stage: it is
# built here, first, and only when its settings changed.
demo: install
	python -m stages.sample --out data/sample
	dvc repro
	@echo "Done. Manifest: data/curated/manifest.parquet; latents: data/cache/; runs/: models and previews."

test: install
	python -m pytest $(PYTEST_ARGS)

.PHONY: lock
lock: install  ## re-pin requirements.lock to what is installed in .venv now
	{ echo "# Exact versions the project is tested with (a pip constraints file). Regenerate with 'make lock'."; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable; } > requirements.lock

# --- Orchestration: a local Prefect server + worker, and DVC's plots offline (README "Running with Prefect")
PREFECT_PORT ?= 4200
# Server database, logs and pid files of `make serve`; git-ignored, and the user's ~/.prefect stays untouched.
PREFECT_LOCAL_HOME ?= .stagewise/prefect
# The JavaScript inlined into plots/offline.html: the majors DVC's own template loads (vega-lite v5 specs).
VEGA_PACKAGES := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0

.PHONY: serve stop serve-status plots plots-template
serve: install  ## start (or reuse) the Prefect server on 127.0.0.1, the `stagewise` pool, both deployments and a worker
	python -m flows.local_server start --home $(PREFECT_LOCAL_HOME) --port $(PREFECT_PORT)

stop:  ## stop the worker (two SIGTERMs: the first starts its shutdown) and then the server
	python -m flows.local_server stop --home $(PREFECT_LOCAL_HOME)

serve-status:
	python -m flows.local_server status --home $(PREFECT_LOCAL_HOME) --port $(PREFECT_PORT)

plots: install  ## loss curves of every training stage into dvc_plots/index.html; renders with no network
	dvc plots show

plots-template:  ## rebuild the committed plots/offline.html from the npm registry (needs npm)
	rm -rf build/npm && mkdir -p build/npm
	cd build/npm && npm pack --silent $(VEGA_PACKAGES)
	$(PYTHON) plots/build_template.py --out plots/offline.html $(addprefix build/npm/,$(subst @,-,$(VEGA_PACKAGES:=.tgz)))

# --- Profiles: named params sets in profiles/<name>.yaml (demo, liae-256, df-512), merged into params.yaml
.PHONY: profile
profile: install  ## merge profiles/$(PROFILE).yaml into params.yaml, comments kept (`git diff params.yaml` shows what changed)
	@test -n "$(PROFILE)" || { echo "usage: make profile PROFILE=<name>; profiles: $(basename $(notdir $(wildcard profiles/*.yaml)))"; exit 2; }
	python -m stagewise.profiles $(PROFILE)

# --- Curation on a Dask cluster (README "Curation on a cluster"): a scheduler + workers on 127.0.0.1
DASK_PORT ?= 8786
DASK_WORKERS ?= 2
DASK_THREADS ?= 1
.PHONY: cluster cluster-stop cluster-status
cluster: install  ## start (or reuse) a Dask scheduler and $(DASK_WORKERS) workers on 127.0.0.1; logs and pids in .stagewise/dask
	python -m flows.local_cluster start --port $(DASK_PORT) --workers $(DASK_WORKERS) --threads $(DASK_THREADS)

cluster-stop:
	python -m flows.local_cluster stop

cluster-status:
	python -m flows.local_cluster status --port $(DASK_PORT)

# --- Artifacts on a DVC remote (README "Artifacts on a DVC remote"): `dvc push`/`pull` plus the outputs
# declared `cache: false` (latent cache, optimizer state, resume backups) that `dvc push` leaves behind
.PHONY: push pull
push: install  ## dvc push, then data/cache/<px>, runs/*/state.safetensors and runs/*/backups to the same remote
	python -m stagewise.remote push $(if $(REMOTE),-r $(REMOTE))

pull: install  ## dvc pull, then the uncached outputs this commit's dvc.lock names (only those absent here)
	python -m stagewise.remote pull $(if $(REMOTE),-r $(REMOTE))

# --- Watermark evaluation: held-out clean photos from Debian wallpaper packages (README "Learned watermark head")
.PHONY: eval-photos
eval-photos:  ## fetch Debian wallpapers/photos into data/eval_photos (git-ignored) for benchmarks/watermark_eval.py
	python benchmarks/fetch_eval_photos.py --out data/eval_photos
