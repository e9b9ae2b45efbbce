#!/usr/bin/env bash
# Rehearse a real deployment on this machine: provision (POC mode, mutual TLS), start a server and
# local sites as NVFlare processes, run the stage jobs, collect global models and metrics, stop
# everything (also on failure or Ctrl-C). Arguments go to `bsf deploy poc`, e.g.
#   provisioning/poc.sh --out poc_out
#   provisioning/poc.sh --out poc_out --stages stage1 --rounds 2 --local-steps 2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/.venv/bin/bsf" deploy poc "$@"
