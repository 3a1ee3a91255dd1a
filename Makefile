# One command per job; each sets up ./.venv first (idempotent). See README.md.
.PHONY: setup run test lint quality-benchmark index-benchmark serve-benchmark reliability-benchmark replay-benchmark train-scale-benchmark

setup:
	bash scripts/setup.sh

## run: set up, train on the default (synthetic) data, build and publish the index, load the training users'
## features and histories into the embedded Redis, and serve on port 8000 (prints a curl example)
run: setup
	.venv/bin/twotower train --artifacts artifacts
	.venv/bin/twotower reindex --artifacts artifacts
	.venv/bin/twotower load-features --artifacts artifacts
	.venv/bin/twotower serve --artifacts artifacts --port 8000

## test: set up, lint, type-check and run the test suite
test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/hadolint Dockerfile
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/hadolint Dockerfile

quality-benchmark: setup
	.venv/bin/python -m benchmarks.quality --data ../shared/data/ml-100k,../shared/data/citeulike-a --seeds 0,1,2 --tune-seconds 600

index-benchmark: setup
	.venv/bin/python -m benchmarks.index --items 100000,1000000 --dim 64

serve-benchmark: setup
	.venv/bin/python -m benchmarks.serve --items 100000 --workers 1,2 && .venv/bin/python -m benchmarks.serve --items 1000000

reliability-benchmark: setup
	.venv/bin/python -m benchmarks.reliability

replay-benchmark: setup
	.venv/bin/python -m benchmarks.replay --data ../shared/data/ml-100k

train-scale-benchmark: setup
	.venv/bin/python -m benchmarks.train_scale
