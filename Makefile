# The two commands a new user runs (see README):
#   make demo   set up .venv and run the main job on the built-in phantom data
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedxr-installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the declared dependencies change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[train,console,dev]'
	# ExecuTorch, for on-device training (fedxr.crossdevice.ondevice): without its declared dependencies, which
	# pull coremltools, torchao and hydra; what the training step needs is here (README, "Devices that learn together").
	# Optional: where it cannot be installed, fedxr works and its ExecuTorch test skips (CI requires it).
	-$(PY) -m pip install --no-deps 'executorch==1.5.1' 'ruamel.yaml' tabulate
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedxr run recipes/quickstart.yaml
	@echo
	@echo "See it in the web console (this machine only, http://127.0.0.1:8700/):"
	@echo "  $(VENV)/bin/fedxr console add-user YOUR-NAME --role coordinator"
	@echo "  $(VENV)/bin/fedxr console"

test: $(STAMP)
	$(VENV)/bin/ruff check fedxr benchmarks tests
	$(VENV)/bin/mypy
	$(PY) -m pytest

clean:
	rm -rf runs .cache data/phantom
