#!/usr/bin/env bash
# Sets up a fresh machine, builds, and runs every test suite.
#   THINFS_MODEL_OPS=N   operations per randomized model run (default 3000; try 50000 on demand)
#   THINFS_SEED=N        replay a randomized run
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
swift build --build-tests
swift test --skip-build
bash scripts/vm/suite.sh   # the kernel suite in a qemu guest (scripts/vm/README.md); skips loudly without qemu
