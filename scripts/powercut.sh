#!/usr/bin/env bash
# Simulated power cuts (Tests/ThinFSTests/PowerCutTests.swift): a seeded workload on the layer
# store is recorded write by write and flush by flush, then replayed at many cut points, each
# checked with thin_check, the store's recovery, e2fsck -fn and the acknowledged writes.
#   THINFS_POWERCUT_CUTS=N   cut points (default 200, CI's budget; try 3000 on demand)
#   THINFS_SEED=N            replay a run (the seed is printed at the start)
# Expects a build with tests (swift build --build-tests). The last lines of a failed run name
# the seed, the cut point and the check that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp /tmp/thinfs-powercut.XXXXXX.log)
set +e
THINFS_POWERCUT=1 swift test --skip-build --filter PowerCutTests 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)) || grep -q 'POWERCUT FAILED' "$log" || ! grep -q 'cut points checked' "$log"; then
  echo "=== powercut.sh: FAILED (exit $rc; full log: $log)"
  grep -E '^power cuts: seed' "$log" | head -n 1
  grep -E 'POWERCUT FAILED|✘|Fatal error' "$log" | tail -n 20
  exit 1
fi
grep -E '^power cuts:' "$log"
rm -f "$log"
