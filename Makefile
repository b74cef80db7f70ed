# Two commands on a fresh machine:  make demo  (the whole pipeline, tiny profile, CPU)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch + torchvision that lie on this machine's disk (timm and torch-fidelity need torchvision, which does not
# import beside the 2.13 CPU wheel). GPU boxes: make install TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install demo core-demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed
	@$(BIN)/python -m pipelines.home >/dev/null   # creates $(DAGSTER_HOME) with dagster.yaml if missing

# The whole graph (shards -> ... -> FID report) as Dagster assets on the tiny profile; a rerun is all cached.
demo: install
	$(BIN)/python -m pipelines.demo

# The bare sfd_core demo: train the tiny SFD model on synthetic latents and sample all three phases.
core-demo: install
	$(BIN)/python -m sfd_core.demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .dagster_home artifacts
