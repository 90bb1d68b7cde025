#!/usr/bin/env bash
# The whole test suite: sets up .venv/ if needed, then runs ruff and pytest. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check mambaout tests
ruff format --check mambaout tests
python -m pytest "$@"
