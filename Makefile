# Two commands matter: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Without a GPU, install torch's CPU wheel first so nothing below can pull a multi-GB CUDA build;
# with one (nvidia-smi present), pip's default CUDA torch satisfies pyproject's range.
TORCH_CPU := torch==2.13.0
DEMO_SPEC := jobspecs/examples/tiny-lora.yaml

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobspecs.examples.build_assets
	@job=$$($(BIN)/peftfleet submit $(DEMO_SPEC) --wait) && \
	  $(BIN)/peftfleet artifacts $$job && \
	  $(BIN)/peftfleet fetch $$job demo-output/$$job && \
	  echo "demo: job $$job finished; artifacts verified and fetched to demo-output/$$job"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not benchmark" --durations=20

# The edit-test loop (≤ 5 min on 2 cores): spec, store, CLI plumbing, CorDA math, one tiny end-to-end job.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not benchmark and not slow" --durations=10

bench: $(STAMP)
	$(BIN)/pytest -q -s -m benchmark tests/benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-output jobspecs/examples/assets .pytest_cache
