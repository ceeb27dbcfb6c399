# The README's two commands: `make demo` and `make test`. Everything else here prepares for them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lock deps clean

demo: $(STAMP)
	$(BIN)/smsctl demo

# The suite mostly waits (for workers, ticks, providers' answers), so it runs on TEST_PROCESSES processes;
# then the tests that measure rates and latencies run on three, those that share the fleet's rate limiter
# (group "rates") one after the other; last, alone, those that change the database server's global state.
TEST_PROCESSES ?= 4

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal -m "not timing and not alone"
	$(BIN)/python -m pytest -n 3 --dist loadgroup -m "timing and not alone"
	$(BIN)/python -m pytest -m alone

# System packages: the MariaDB client headers mysqlclient compiles against, docker-compose, which the tests
# use to validate docker-compose.yml (no Docker engine needed), and faketime, which runs a worker on a skewed
# clock in tests/test_isolation.py. A fresh Debian machine may lack all three.
deps:
	@missing=""; \
	pkg-config --exists libmariadb 2>/dev/null || pkg-config --exists mysqlclient 2>/dev/null \
	  || missing="libmariadb-dev pkg-config"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): requirements.lock pyproject.toml | deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-pin every dependency after editing pyproject.toml (needs `uv` on the PATH).
lock:
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -q -o requirements.lock

clean:
	rm -rf $(VENV) var
