# The two set-up-and-run commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed-base

# libtpu (the version jax[tpu] pins) outside site-packages: experiments/tpu_topology.py loads it to compile for
# a TPU this machine does not have (bench/tpu_compile, plan target=); no other process loads a TPU plugin
$(VENV)/.installed-libtpu: $(VENV)/.installed-test
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/libtpu \
		"$$($(PY) -c 'from experiments.tpu_topology import libtpu_requirement as r; print(r())')"
	touch $@

demo: $(VENV)/.installed-base
	$(PY) -m experiments.induction_heads

test: $(VENV)/.installed-test $(VENV)/.installed-libtpu
	$(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.installed-test
	$(PY) -m experiments.bench.cpu_forward

clean:
	rm -rf $(VENV) build *.egg-info
