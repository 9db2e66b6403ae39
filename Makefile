# The two commands of the README. Both create or reuse .venv (scripts/setup_venv.sh).
.PHONY: setup render test bench

setup:
	@bash scripts/setup_venv.sh

render: setup
	.venv/bin/python launch/generate.py --config configs/tiny.yaml --out outputs/tiny.mp4

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/attention.py
