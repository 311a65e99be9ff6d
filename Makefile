# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install the project into it first (torch pinned to the versions this project is tested with).
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
# promtool and prometheus for the deployment tests, unpacked here (git-ignored).
TOOLS := .deploy-tools

.PHONY: install test lint serve deploy-tools
install: .venv/.installed

.venv/.installed: pyproject.toml setup.py
	@echo "make install: .venv with $(TORCH) and the project (editable, with its test tools)."
	@echo "  About 3 GB to download (torch and its CUDA libraries are most of it), about 6 GB in .venv."
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[test]'
	touch $@

lint: install
	$(PY) -m ruff check .

# The tests find promtool and prometheus in $(TOOLS)/usr/bin (put first on PATH here, and
# looked up there by tests/deploy_helpers.py).
test: install deploy-tools lint
	PATH="$(CURDIR)/$(TOOLS)/usr/bin:$$PATH" $(PY) -m pytest -q

# promtool and prometheus for the deployment tests (tests/test_deploy_*.py): Debian's
# `prometheus` package, downloaded and unpacked into $(TOOLS)/, not installed: no system
# service is enabled or started, nothing outside this folder changes (but apt's package
# lists, refreshed as root when the download needs it). Elsewhere put promtool and
# prometheus on PATH yourself; without them those tests fail and say so.
deploy-tools: $(TOOLS)/usr/bin/promtool

$(TOOLS)/usr/bin/promtool:
	@if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
	    echo "warning: no apt-get/dpkg-deb here: put promtool and prometheus on PATH yourself (tests/test_deploy_*.py need them)"; \
	    exit 0; \
	fi; \
	echo "deploy-tools: downloading Debian's prometheus package (about 20 MB) and unpacking promtool and prometheus into $(TOOLS)/ (not installed: no service is started)"; \
	rm -rf $(TOOLS) && mkdir -p $(TOOLS)/download && cd $(TOOLS)/download || exit 1; \
	root=$$([ "$$(id -u)" = 0 ] && echo yes); \
	sandbox=$${root:+-o APT::Sandbox::User=root}; \
	apt-get download -q $$sandbox prometheus || { [ -n "$$root" ] && \
	    echo "deploy-tools: refreshing apt's package lists (apt-get update)" && \
	    apt-get update -q && apt-get download -q $$sandbox prometheus; } || { \
	    echo "warning: could not download Debian's prometheus package: tests/test_deploy_*.py will fail"; \
	    exit 0; }; \
	dpkg-deb -x prometheus_*.deb .. && cd .. && rm -rf download && ./usr/bin/promtool --version | head -1

serve: install
	$(PY) -m service
