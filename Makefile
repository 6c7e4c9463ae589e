# textspan: `make demo` and `make test` are all a new user needs; each sets everything up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The bindings crate is built by maturin with the venv's Python; clippy checks it with the same.
export PYO3_PYTHON := $(abspath $(PY))
DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.extension-built
RUST_SOURCES := Cargo.toml Cargo.lock pyproject.toml $(wildcard rust/*/Cargo.toml rust/*/src/*.rs)

.PHONY: help setup demo test test-fast lint rust-test pytest bench bench-gpu wheel wheel-check clean

help:
	@echo "make demo   set up, then run the main job on the embedded default"
	@echo "make test   set up, then run every check and test"
	@echo "make bench  criterion benches and the Python side-by-side benchmarks"
	@echo "make bench-gpu  the GPU benchmark (needs a CUDA device)"
	@echo "make wheel  build a release wheel into dist/ (make wheel-check installs it fresh)"

# One install step owns every Python dependency (pinned in requirements-dev.txt).
$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The extension, release mode, installed into the venv; rebuilt when the Rust side changes.
$(EXT_STAMP): $(DEPS_STAMP) $(RUST_SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

setup: $(EXT_STAMP)

demo: setup
	$(VENV)/bin/textspan demo

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m mypy.stubtest textspan._core

# The core crate needs no Python: plain cargo.
rust-test:
	cargo test --quiet

pytest: setup
	$(PY) -m pytest

test: lint rust-test pytest

# Everything but the tests marked slow.
test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	cargo bench --bench textspan
	$(PY) benches/bench_textspan.py
	$(PY) benches/bench_decompose.py
	$(PY) benches/bench_segmentation.py
	$(PY) benches/bench_ray.py

# On a CUDA device: decomposition / encode_image ratios and extraction throughput for ViT-B-16
# and ViT-L-14 (random weights), fp32 and fp16, batch 64 and 256.
bench-gpu: setup
	$(PY) benches/bench_gpu.py

wheel: setup
	$(VENV)/bin/maturin build --release --out dist

# Installs the wheel into a fresh virtual environment and uses it there.
wheel-check: wheel
	rm -rf build/wheel-venv
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/pip install --quiet dist/textspan-*.whl
	cd /tmp && $(abspath build/wheel-venv/bin/python) -c 'import numpy as np, textspan; \
	  r = textspan.text_span(np.random.default_rng(0).standard_normal((50, 8)), np.eye(8), n_texts=3, rank=8); \
	  print("wheel ok:", textspan.__file__, r.indices)'

clean:
	rm -rf target dist build $(VENV) python/textspan/*.so
