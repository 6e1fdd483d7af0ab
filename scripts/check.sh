#!/usr/bin/env bash
# Lint and type check, run by `make test` before the tests (fails fast): ruff (pyproject.toml's
# [tool.ruff]; formatting is not enforced, see there) and mypy (strict on distopt/, basic elsewhere;
# the files and settings are pyproject.toml's [tool.mypy]). Uses the project's .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
.venv/bin/ruff check . || status=1
.venv/bin/mypy || status=1
exit "$status"
