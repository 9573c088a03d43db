# The two commands of the README: `make demo` and `make test`. Both install what is missing first.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

PY := .venv/bin/python

.PHONY: setup demo test lint stac-up stac-down clean

setup:
	@bash infra/setup.sh

demo: setup
	.venv/bin/cropflow demo

test: setup
	$(PY) -m pytest -q --durations=20

lint: setup
	.venv/bin/ruff check .

stac-down:
	-.venv/bin/cropflow stac down

clean: stac-down
	rm -rf .cropflow
