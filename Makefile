# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install, run the main job on the embedded default config
#   make test   -- create .venv, install with test extras, run the test suite
#
# The torch build is an explicit choice, installed first so that resolving the other
# dependencies never pulls a multi-GB build you did not ask for:
#   TORCH_VARIANT=cpu    (default) PyTorch's CPU wheel, torch==$(TORCH_VERSION)+cpu
#   TORCH_VARIANT=cu128  a CUDA build from PyTorch's index (cu126, cu128, ...: the CUDA you have)
#   TORCH_VARIANT=keep   whatever torch .venv already holds (install your own first)
# e.g.  make test TORCH_VARIANT=cu128

PYTHON        ?= python3
VENV          ?= .venv
PY             = $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_VARIANT ?= cpu
TORCH_INDEX   ?= https://download.pytorch.org/whl/$(TORCH_VARIANT)
TORCH_SPEC     = torch==$(TORCH_VERSION)+$(TORCH_VARIANT)

.PHONY: demo test install torch clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $@

# the configured indexes first (a wheel already on this machine, a mirror); PyTorch's own index
# only when they have no such build
torch:
	@if [ "$(TORCH_VARIANT)" = keep ]; then \
	  $(PY) -c "import torch" || { echo "TORCH_VARIANT=keep: no torch in $(VENV); install one first" >&2; exit 1; }; \
	elif $(PY) -c "import torch, sys; sys.exit(torch.__version__ != '$(TORCH_VERSION)+$(TORCH_VARIANT)')" 2>/dev/null; then \
	  :; \
	else \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || \
	  $(PY) -m pip install -q --extra-index-url $(TORCH_INDEX) "$(TORCH_SPEC)"; \
	fi

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tiered demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
