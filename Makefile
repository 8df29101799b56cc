# `make demo` runs the main job, `make test` the whole suite. Both build .venv on first use.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: demo test lint reproduce clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# mup is the μP anchor of the transfer benchmark; its torchvision dependency breaks transformers here.
	$(PIP) install -q --no-deps mup
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_fsf.cli demo --out reports/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra tests

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

reproduce: $(STAMP)
	$(PY) -m hf_fsf.cli reproduce --out reports/reproduce

clean:
	rm -rf .venv reports
