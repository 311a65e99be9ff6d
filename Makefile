# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install the project into it first (torch pinned to the versions this project is tested with).
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test serve deploy-tools
install: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install deploy-tools
	$(PY) -m pytest -q

# promtool and prometheus for the deployment tests (tests/test_deploy_*.py): Debian's
# `prometheus` package, installed when they are missing and apt-get can (CI runs as root on
# Debian). Elsewhere install Prometheus yourself; without it those tests fail and say so.
deploy-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's prometheus package (promtool, prometheus) for the deployment tests"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	else \
	    echo "warning: promtool/prometheus not found (Debian/Ubuntu: apt-get install prometheus); tests/test_deploy_*.py will fail"; \
	fi

serve: install
	$(PY) -m service
