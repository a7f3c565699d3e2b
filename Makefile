# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates the virtual environment it needs on first use.

VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed-base: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml examples/surgery-plugin-example/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps -e examples/surgery-plugin-example
	touch $@

# Real data for the demo: Debian's Fashion-MNIST package (installed once if missing).
fashion-mnist: $(VENV)/.installed-base
	@$(PY) -c "import surgery.datasets as d; d.fashion_mnist('test')" 2>/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

demo: $(VENV)/.installed-base fashion-mnist
	$(VENV)/bin/surgery demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

.PHONY: demo test fashion-mnist
