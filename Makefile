# Set-up is idempotent: the venv is created once and re-installed only when requirements.txt changes.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENV   := GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: run test test-slow bench install chromium

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	@if $(VENV)/bin/pip list 2>/dev/null | grep -qiE '^(torchvision|nvidia-)'; then \
	  echo "error: torchvision or a CUDA package was installed; see README 'Dependencies'"; exit 1; fi
	@touch $(STAMP)

run: $(STAMP)
	$(ENV) $(PY) app.py

test: $(STAMP) chromium
	$(ENV) $(PY) -m pytest -q

# Debian's chromium for the browser smoke test (root, or sudo without a password)
chromium:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test-slow: $(STAMP)
	$(ENV) $(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(ENV) $(PY) -m bench.sampling
	$(ENV) $(PY) -m bench.shapesworld
	$(ENV) $(PY) -m bench.guidance
	$(ENV) $(PY) -m bench.swap
