# Each target installs first, so one command works on a fresh machine.
PYTHON ?= python3
# The CPU wheel this project is tested with; override for a CUDA build, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install train test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev,hf]"

train: install
	$(PYTHON) examples/train.py

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/attention_memory.py
