#!/usr/bin/env bash
# Remakes the checked-in seed corpora, Fuzz/Corpus/<harness>/.
#   superblock btree space-map pool   written by the harness binaries themselves
#                                     (THINFS_FUZZ_WRITE_SEEDS; MetadataInput.seeds in
#                                     Sources/FuzzSupport/MetadataHarness.swift): a pool the engine
#                                     made, cut the way each harness reads its input
#   layer-tar image docker-dm control make-seeds.py (python's tarfile, json, hashlib)
# Build the harnesses first (FUZZ_BUILD_ONLY=1 scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf Corpus
for h in superblock btree space-map pool; do
  THINFS_FUZZ_WRITE_SEEDS=Corpus/$h .build/release/fuzz-$h
done
python3 make-seeds.py Corpus
find Corpus -type f | sort | xargs ls -l | awk '{print $5, $9}'
