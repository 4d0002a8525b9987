# TurtleMQ: `make run` serves the broker, `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MAX_FRAME_BYTES ?= 1048576
# WebSocket keepalive: seconds idle before the broker pings a peer, and seconds
# without a pong before it drops the peer (and migrates its tasks).
TURTLEMQ_PING_INTERVAL ?= 20
TURTLEMQ_PING_TIMEOUT ?= 30
TEST_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/postgres
TEST_REDIS ?= redis://127.0.0.1:6379/0

.PHONY: run test lint migrate clean chaos bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

migrate: $(VENV)/.runtime
	$(BIN)/python manage.py migrate --noinput

# daphne by default (the design's server); SERVER=uvicorn for the faster one (README, "Which server").
SERVER ?= daphne
run: migrate
ifeq ($(SERVER),uvicorn)
	$(BIN)/uvicorn --host $(HOST) --port $(PORT) --loop uvloop --ws websockets-sansio --ws-max-size $(MAX_FRAME_BYTES) \
		--ws-ping-interval $(TURTLEMQ_PING_INTERVAL) --ws-ping-timeout $(TURTLEMQ_PING_TIMEOUT) turtlemq_site.asgi:application
else ifeq ($(SERVER),daphne)
	$(BIN)/daphne -b $(HOST) -p $(PORT) --websocket-max-message-size $(MAX_FRAME_BYTES) \
		--ping-interval $(TURTLEMQ_PING_INTERVAL) --ping-timeout $(TURTLEMQ_PING_TIMEOUT) turtlemq_site.asgi:application
else
	$(error SERVER must be daphne or uvicorn, not $(SERVER))
endif

lint: $(VENV)/.dev
	$(BIN)/ruff check .

# The suite runs twice: on the embedded default (the end-to-end tests start
# both stacks themselves), then the in-process tests on PostgreSQL + Redis.
test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python -m pytest
	@TURTLEMQ_TEST_POSTGRES=$(TEST_POSTGRES) TURTLEMQ_TEST_REDIS=$(TEST_REDIS) $(BIN)/python -m tests.services; \
	status=$$?; \
	if [ $$status -eq 0 ]; then \
		echo "--- in-process tests again on PostgreSQL + Redis"; \
		DATABASE_URL=$(TEST_POSTGRES) REDIS_URL=$(TEST_REDIS) TURTLEMQ_REDIS_PREFIX=turtlemq-test-$$$$ \
			$(BIN)/python -m pytest -m "not e2e"; \
	elif [ $$status -eq 2 ]; then exit 1; fi

# Two broker processes on a fresh PostgreSQL database + Redis prefix, 8 clients,
# 6 workers, 5,000 tasks, while workers and a broker process are SIGKILLed:
# every result must arrive exactly once. Loopback only, at most CHAOS_DEADLINE s.
CHAOS_DEADLINE ?= 300
chaos: $(VENV)/.dev
	@TURTLEMQ_TEST_POSTGRES=$(TEST_POSTGRES) TURTLEMQ_TEST_REDIS=$(TEST_REDIS) \
		$(BIN)/python scripts/chaos.py --deadline $(CHAOS_DEADLINE) $(CHAOS_ARGS)

# TurtleMQ (embedded on daphne and uvicorn, PostgreSQL + Redis with two processes)
# beside the references of ../shared/bench measured in the same run (bare relays,
# RabbitMQ, Celery); prints the tables and appends them to bench/RESULTS.md. Under
# ten minutes; BENCH_ARGS passes options to bench/run.py (e.g. --note "...").
$(VENV)/.bench: requirements.txt requirements-dev.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $(VENV)/.runtime $(VENV)/.dev $@

bench: $(VENV)/.bench
	BENCH_POSTGRES=$(TEST_POSTGRES) BENCH_REDIS=$(TEST_REDIS) $(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
