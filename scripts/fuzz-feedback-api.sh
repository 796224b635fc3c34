#!/usr/bin/env bash
# Fuzz the feedback app's whole JSON API from its OpenAPI schema (schemathesis), in full: the test
# suite's checks (no 5xx; every answer matches the schema and its content type; as admin and as
# annotator; schema-valid and schema-breaking inputs) with EXAMPLES examples per operation (default
# 1000) on SQLite and on a throwaway PostgreSQL. Usage: scripts/fuzz-feedback-api.sh [EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFTUNE_FUZZ_EXAMPLES=${1:-1000} exec scripts/test-services.sh .venv/bin/python \
  tests/feedback/test_feedback_fuzz.py -p no:cacheprovider -q
