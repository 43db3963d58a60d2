#!/usr/bin/env bash
# Install everything the tests need, then lint, type-check and run the whole suite.
# Usage: ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the real Redis that the Celery broker and Redis tests run against
# (the test suite starts its own instances on free loopback ports and stops them:
# standalone, a 3-node Cluster, and a Sentinel, which is `redis-server --sentinel`;
# each also over TLS). openssl: makes the TLS servers' throwaway CA and certificates.
# rabbitmq-server: the real RabbitMQ the broker tests run against (tests/rabbitmq.py runs
# the server script of Debian's package as this user, on its own loopback ports).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 \
    || [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
    || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "== installing redis-server, rabbitmq-server, openssl, chromium and chromium-driver"
    $SUDO apt-get update -qq
    # (the package's own service is left alone: the tests start their own node;
    # chromium, chromium-driver: the headless browser tests/web drives, through the
    # system's chromedriver, so nothing is downloaded at test time)
    $SUDO apt-get install -y -qq redis-server rabbitmq-server openssl chromium chromium-driver >/dev/null
fi

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
fi
echo "== installing celery-breaker with its dev extra"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'

# What later steps install, made in the background while lint and tests run (downloads and
# unpacking, mostly waiting): the wheel and sdist, a venv with the wheel and one with
# the wheel's [redis] extra, then a venv at the declared lower bounds (one after the
# other: both builds write the checkout's egg-info). The package step waits for them
# and shows the log of the one that failed.
DIST="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIST"' EXIT
(
    # (&&: errexit does not apply inside a command followed by ||)
    {
        "$VENV/bin/python" -m build --outdir "$DIST" . &&
        python3 -m venv "$DIST/venv" &&
        "$DIST/venv/bin/python" -m pip install -q --disable-pip-version-check "$DIST"/*.whl &&
        python3 -m venv "$DIST/redis-venv" &&
        "$DIST/redis-venv/bin/python" -m pip install -q --disable-pip-version-check "$(ls "$DIST"/*.whl)[redis]"
    } > "$DIST/package.log" 2>&1 || { echo "$DIST/package.log"; exit 1; }
    # Python $1 (3.10) where the machine has it, pyenv's or the system's, else nothing.
    # (A pyenv shim on PATH answers only where that version is selected: each is tried.)
    python_of() {
        for candidate in "$HOME"/.pyenv/versions/"$1".*/bin/python "$(command -v "python$1" || true)"; do
            if [ -n "$candidate" ] && "$candidate" -c "import sys; assert sys.version_info[:2] == (${1/./, })" 2>/dev/null; then
                echo "$candidate"
                return
            fi
        done
    }
    # The lower bounds' venv on the oldest Python the package claims, where the machine
    # has it, so that the oldest of everything runs together; else, or if it cannot be
    # made, on python3.
    PY310="$(python_of 3.10)"
    make_oldest() {
        rm -rf "$DIST/oldest" &&
        "$1" -m venv "$DIST/oldest" &&
        "$DIST/oldest/bin/python" -m pip install -q --disable-pip-version-check -c scripts/minimum-versions.txt \
            -e '.[redis,prometheus]' pytest hypothesis
    }
    {
        { [ -n "$PY310" ] && make_oldest "$PY310"; } || make_oldest python3
    } > "$DIST/oldest.log" 2>&1 || { echo "$DIST/oldest.log"; exit 1; }
    # The newest Python the package claims, where the machine has it: its venv, for
    # tests/unit and tests/web below. Not having it skips them.
    PY313="$(python_of 3.13)"
    if [ -n "$PY313" ]; then
        { "$PY313" -m venv "$DIST/py313" && "$DIST/py313/bin/python" -m pip install -q \
            --disable-pip-version-check -e '.[dev]'; } > "$DIST/py313.log" 2>&1 || rm -rf "$DIST/py313"
    fi
) > "$DIST/failed" &
INSTALLS=$!

echo "== benchmark smoke runs, beside ruff and mypy (figures are not checked; mostly waiting on real servers)"
(
    {
        "$VENV/bin/python" bench/overhead.py --quick --no-threads &&
        "$VENV/bin/python" bench/redis_store.py --quick &&
        "$VENV/bin/python" bench/many_keys.py --quick &&
        "$VENV/bin/python" bench/idle_releasers.py --quick &&
        "$VENV/bin/python" bench/outage_timeline.py --quick --json "$DIST/outage.json" &&
        "$VENV/bin/python" bench/plot_outage.py --out "$DIST/outage.png" "$DIST/outage.json"
    } > "$DIST/bench.log" 2>&1
) &
BENCH=$!
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
# The package claims Python 3.10+: type-check it against 3.10's standard library too
# (3.11-only calls are what would break there), also where no 3.10 runs the tests.
"$VENV/bin/mypy" --python-version 3.10 src
wait "$BENCH" || { cat "$DIST/bench.log"; echo "a benchmark smoke run failed"; exit 1; }
# The lower bounds' run: the tests that touch Celery, kombu and redis-py, in the venv at
# the declared lowest versions. (redis-py 5.1 prints "Exception ignored in Redis.__del__"
# at interpreter exit: the log is shown only when a test fails. Celery 5.5's
# AsyncResult.__del__ raises when its Redis result backend has stopped by the time a
# result is collected (5.7's does not): that one unraisable is not ours to fail on.)
oldest_tests() {
    "$DIST/oldest/bin/python" -m pytest -q -p no:cacheprovider tests/unit tests/celery tests/storage tests/cli \
        -o 'filterwarnings=error::pytest.PytestUnraisableExceptionWarning
ignore:Exception ignored in. <function AsyncResult.__del__:pytest.PytestUnraisableExceptionWarning' \
        > "$DIST/oldest-tests.log" 2>&1
}
# A failed run's log, without redis-py 5.1's exit-time tracebacks (hundreds of lines of
# "Exception ignored in Redis.__del__" that would push the failures off the end), then
# its failures and summary again, last, where a truncated CI view still shows them.
show_failed() {
    sed '/^Exception ignored in: <function Redis.__del__/,/^AttributeError: .NoneType. object has no attribute .getpid./d' "$1"
    echo "== $1: failures"
    grep -E '^(FAILED|ERROR) |^[0-9]+ (passed|failed|error)|(passed|failed|error).* in [0-9.]+s' "$1" || tail -n 20 "$1"
}
# (the slowest tests named in the log: what to size down when the run grows)
if [ "$#" -gt 0 ]; then
    echo "== pytest $*"
    "$VENV/bin/python" -m pytest --durations=25 "$@"
    wait "$INSTALLS" || { cat "$(cat "$DIST/failed")"; exit 1; }
    OLDEST_TESTS=""
else
    # Real workers, brokers and browsers, whose waits a busy machine stretches: apart from
    # the rest. They mostly wait (a quarter of one core, measured over the whole part), so
    # two pytest processes share them, a test file each at a time (its module fixtures
    # start once): 904 s alone, 459 s in two. Every server is on free ports of its own.
    echo "== pytest: tests/integration and the examples (two processes)"
    "$VENV/bin/python" -m pytest -n 2 --dist loadfile --durations=15 tests/integration tests/test_examples.py
    # The rest is mostly one process on one core each: beside the lower bounds' run.
    wait "$INSTALLS" || { cat "$(cat "$DIST/failed")"; exit 1; }
    echo "== pytest: everything else (the lower bounds' run beside it, reported below)"
    oldest_tests &
    OLDEST_TESTS=$!
    "$VENV/bin/python" -m pytest --durations=10 --ignore=tests/integration --ignore=tests/test_examples.py
fi
echo "== package: build the wheel and sdist, check them, run the quick start from the wheel"
"$VENV/bin/twine" check --strict "$DIST"/*.whl "$DIST"/*.tar.gz
# From outside the checkout, so the installed wheel (not src/) is what runs.
(cd "$DIST" && "$DIST/venv/bin/python" "$OLDPWD/examples/quickstart.py" > "$DIST/demo.log") || { cat "$DIST/demo.log"; exit 1; }
tail -n 4 "$DIST/demo.log"
# The public API's types as a user sees them: mypy --strict over a consumer program,
# resolving celery_breaker in the wheel's venv (its py.typed and inline types).
printf '[mypy]\nstrict = True\ndisallow_untyped_decorators = False\n[mypy-celery.*,kombu.*]\nignore_missing_imports = True\n' > "$DIST/mypy.ini"
cp tests/typing/consumer.py "$DIST/consumer.py"
MYPY="$(realpath "$VENV/bin/mypy")"
(cd "$DIST" && "$MYPY" --config-file mypy.ini --no-incremental --python-executable "$DIST/venv/bin/python" consumer.py) \
    || { echo "the wheel's public API does not type-check"; exit 1; }
(cd "$DIST" && "$DIST/venv/bin/python" consumer.py)
# The documented install, `pip install "celery-breaker[redis]"`, from the wheel alone into a
# fresh venv: a real worker on a Redis broker starts and runs a guarded task.
(cd "$DIST" && "$DIST/redis-venv/bin/python" "$OLDPWD/scripts/wheel_worker_smoke.py")
echo "== the quick start followed command by command (docs/quickstart.md), in that venv"
(cd "$DIST" && "$DIST/redis-venv/bin/python" "$OLDPWD/scripts/quickstart_path.py" > "$DIST/quickstart-path.log" 2>&1) \
    || { cat "$DIST/quickstart-path.log"; exit 1; }
tail -n 1 "$DIST/quickstart-path.log"
echo "== docs: mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --site-dir "$DIST/site" > "$DIST/mkdocs.log" 2>&1 \
    || { cat "$DIST/mkdocs.log"; exit 1; }
echo "== the declared lower bounds: Celery 5.5, kombu 5.5, redis-py 5.1 (scripts/minimum-versions.txt), Python 3.10 where the machine has it"
"$DIST/oldest/bin/python" --version
"$DIST/oldest/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(celery|kombu|redis) '
if [ -n "$OLDEST_TESTS" ]; then
    wait "$OLDEST_TESTS" || { show_failed "$DIST/oldest-tests.log"; exit 1; }
else
    oldest_tests || { show_failed "$DIST/oldest-tests.log"; exit 1; }
fi
grep -E '^[0-9]+ passed' "$DIST/oldest-tests.log"
echo "== Python 3.13: tests/unit and tests/web"
if [ -x "$DIST/py313/bin/python" ]; then
    "$DIST/py313/bin/python" -m pytest -q -p no:cacheprovider tests/unit tests/web > "$DIST/py313-tests.log" 2>&1 \
        || { show_failed "$DIST/py313-tests.log"; exit 1; }
    grep -E '^[0-9]+ passed' "$DIST/py313-tests.log"
else
    echo "skipped: no Python 3.13 on this machine, or its venv could not be made ($(tail -n 1 "$DIST/py313.log" 2>/dev/null))"
fi
echo "== all checks passed"
