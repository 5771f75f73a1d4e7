#!/usr/bin/env bash
# Runs every benchmark in benchmarks/, one after the other. Each prints one JSON object on
# stdout (progress goes to stderr), so `benchmarks/run_all.sh > results.jsonl` keeps them.
#
#   benchmarks/run_all.sh            full sizes (a few minutes in all on 2 cores)
#   benchmarks/run_all.sh --quick    smoke sizes (under a minute)
#
# PYTHON overrides the interpreter (default: .venv/bin/python). A failing benchmark does
# not stop the others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

quick=0
case "${1:-}" in
  "") ;;
  --quick) quick=1 ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

failed=()
for name in bench_decode bench_score bench_ingest bench_memory bench_contention; do
  script="benchmarks/$name.py"
  [[ -f "$script" ]] || continue
  args=()
  if (( quick )); then
    if [[ "$name" == bench_decode ]]; then
      args=(--seconds 0.2)  # bench_decode.py has no --quick; less time per decoder instead
    else
      args=(--quick)
    fi
  fi
  echo "== $name ${args[*]+"${args[*]}"}" >&2
  start=$SECONDS
  if ! "$PY" "$script" ${args[@]+"${args[@]}"}; then
    failed+=("$name")
  fi
  echo "== $name done in $((SECONDS - start)) s" >&2
done

if (( ${#failed[@]} )); then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
