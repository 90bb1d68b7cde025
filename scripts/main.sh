#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv/ if needed, then runs it. Extra arguments go to the command.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mambaout models
mambaout demo "$@"
