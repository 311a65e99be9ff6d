# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install the project into it first (torch pinned to the versions this project is tested with).
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test serve
install: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

serve: install
	$(PY) -m service
