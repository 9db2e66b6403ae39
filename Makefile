# The two commands of the README. Both create or reuse .venv (scripts/setup_venv.sh).
.PHONY: setup render test test-fast lint bench

setup:
	@bash scripts/setup_venv.sh

render: setup
	.venv/bin/python launch/generate.py --config configs/tiny.yaml --out outputs/tiny.mp4

test: setup lint
	.venv/bin/python -m pytest -q --durations=20

test-fast: setup  # the unit tier: plan math, kernels, models in-process (no subprocesses)
	.venv/bin/python -m pytest -q -m unit

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python bench/attention.py
