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

# The demo (nanoseek/demo.py): build the built-in arithmetic corpus and its tokenizer, pretrain the `nano`
# preset, run GRPO from it, run the time-matched SFT control, evaluate all three on held-out problems and
# write runs/demo/report.md. About 15 minutes on 2 CPU cores; finished stages are reused on a rerun.
demo: $(STAMP)
	$(PY) -m nanoseek demo

clean:
	rm -rf $(VENV) .pytest_cache
