#!/bin/sh
# docker run medseg <plan|train|predict|cv-summary> [overrides...]  ->  medseg-<command> [overrides...]
set -e
case "${1:-}" in
  plan|train|predict|cv-summary) cmd="medseg-$1"; shift; exec "$cmd" "$@" ;;
  *) exec "$@" ;;
esac
