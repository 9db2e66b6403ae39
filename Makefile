# The two commands of the README. Both create or reuse .venv (scripts/setup_venv.sh).
.PHONY: setup render test test-fast lint bench lock

setup:
	@bash scripts/setup_venv.sh

render: setup
	.venv/bin/python launch/generate.py --config configs/tiny.yaml --out outputs/tiny.mp4

# pytest-xdist workers (tests/conftest.py groups the tests); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: setup lint
	.venv/bin/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup  # the unit tier: plan math, kernels, models in-process (no subprocesses)
	.venv/bin/python -m pytest -q -m unit

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python bench/attention.py

# Refresh requirements/lock.txt, deliberately: edit requirements/lock.in or move LOCK_DATE forward, run this, and
# commit the lock. Deterministic: the resolver sees only releases uploaded before LOCK_DATE, so two runs (on any
# day) write the same file. uv is itself in the lock.
LOCK_DATE = 2026-12-01T00:00:00Z
lock: setup
	.venv/bin/uv pip compile requirements/lock.in --quiet --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --find-links /opt/wheels --exclude-newer $(LOCK_DATE) \
		--no-emit-package freeloc-dist --custom-compile-command "make lock" -o requirements/lock.txt
