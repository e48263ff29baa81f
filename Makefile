# evscrypt: see README.md.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: install test demo bench bench-rbd bench-crypto install-systemd clean soak

install:
	@scripts/install.sh

test: install
	$(PYTEST) -q -ra $(PYTEST_ARGS)

demo: install
	@scripts/demo.sh

bench-crypto: install
	$(PY) bench/bench_crypto.py

install-systemd: install
	@scripts/install-systemd.sh

clean:
	rm -rf $(VENV) .venv-stock build dist *.egg-info .pytest_cache .hypothesis

bench: install
	@scripts/bench.sh

bench-rbd: install
	@BENCH_ONLY_INSTALL=1 scripts/bench.sh
	$(PY) bench/bench_rbd.py

soak: install
	$(PY) scripts/soak.py
