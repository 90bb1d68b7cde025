#!/usr/bin/env bash
# The whole test suite: sets up .venv/ if needed, then runs ruff and pytest. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# the demo's page tests drive Debian's chromium through Playwright (which cannot download its own browsers here)
if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium for the demo's browser tests" >&2
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
ruff check mambaout tests
ruff format --check mambaout tests
python -m pytest "$@"
