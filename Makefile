# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install, run the main job on the embedded default config
#   make test   -- create .venv, install with test extras, run the test suite
# torch is installed first, pinned to the CPU wheel, so that no dependency
# resolution ever pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tiered demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
