#!/usr/bin/env bash
# Mutation testing of vmirq's pure models and protocols (docs/mutants.md): one cargo-mutants
# run per module group, each with the tests that cover it, then a per-file score table.
#
#   cargo install --locked cargo-mutants
#   scripts/mutants.sh            # every group (about an hour on 2 cores)
#   scripts/mutants.sh ioapic     # one group
#
# Results: target/mutants/<group>/mutants.out (caught.txt, missed.txt, outcomes.json).
set -euo pipefail
cd "$(dirname "$0")/.."

group() {
  local name=$1; shift
  local files=()
  while [ "$1" != "--" ]; do files+=(-f "$1"); shift; done
  shift
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  echo "== $name"
  # loom_tests: the loom models' helpers exist only under `--cfg loom`, so no build sees
  # their mutations.
  cargo mutants -p vmirq --test-package vmirq --profile mutants -j 2 "${files[@]}" \
    --exclude-re 'loom_tests' \
    -o "target/mutants/$name" -- "$@" || true   # non-zero when a mutant survives
}

ONLY=${1:-}
group ioapic crates/vmirq/src/ioapic/mod.rs crates/vmirq/src/ioapic/spec.rs -- --lib ioapic::
group msi crates/vmirq/src/msi.rs -- --lib msi
# The Xen close/send stress test (28 s) is left out everywhere: the loom model of the same
# protocol covers it. Groups whose files the IOAPIC and Xen model tests never reach skip
# those too (they cost seconds per mutant).
SKIP_MODELS=(--skip close_racing --skip ioapic:: --skip xen::)
group route crates/vmirq/src/route.rs -- --lib --test router -- --skip close_racing
group xen crates/vmirq/src/xen/layout.rs crates/vmirq/src/xen/ports.rs crates/vmirq/src/xen/ops.rs \
  -- --lib xen:: -- --skip close_racing
group protocols crates/vmirq/src/line.rs crates/vmirq/src/resample.rs crates/vmirq/src/router.rs \
  -- --lib --test router --test locks --test level_core --test sim_irqfd \
  -- "${SKIP_MODELS[@]}" --skip msix::
group msix crates/vmirq/src/msix/table.rs crates/vmirq/src/msix/msi.rs \
  crates/vmirq/src/msix/vectors.rs crates/vmirq/src/msix/spec.rs -- --lib --test msix_core \
  -- "${SKIP_MODELS[@]}"

python3 - <<'PY'
import collections, glob, json, os
rows = collections.defaultdict(collections.Counter)
for path in glob.glob("target/mutants/*/mutants.out/outcomes.json"):
    for o in json.load(open(path))["outcomes"]:
        s = o["scenario"]
        if s == "Baseline":
            continue
        f = s["Mutant"]["file"]
        rows[f][o["summary"]] += 1
print(f"{'file':<34} {'caught':>6} {'missed':>6} {'timeout':>7} {'unviable':>8} {'score':>6}")
for f in sorted(rows):
    c = rows[f]
    caught, missed, timeout = c["CaughtMutant"], c["MissedMutant"], c["Timeout"]
    viable = caught + missed + timeout
    score = 100.0 * (caught + timeout) / viable if viable else 100.0
    print(f"{f.removeprefix('crates/vmirq/src/'):<34} {caught:>6} {missed:>6} {timeout:>7} {c['Unviable']:>8} {score:>5.1f}%")
PY
