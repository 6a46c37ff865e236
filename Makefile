# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# TORCH is the torch requirement installed before the package; on a GPU machine with
# its own torch, run `make test TORCH=` to keep the installed one.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The demo: build the built-in reasoning corpus and its tokenizer, pretrain the `nano` preset for about
# five minutes, print held-out accuracy and where the report and plots are.
demo: $(STAMP)
	$(PY) -m nanoseek train --config configs/nano.toml

clean:
	rm -rf $(VENV) .pytest_cache
