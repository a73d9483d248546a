#!/usr/bin/env bash
# Sets up a fresh machine, builds, and runs every test suite.
#   THINFS_MODEL_OPS=N   operations per randomized model run (default 3000; try 50000 on demand)
#   THINFS_SEED=N        replay a randomized run
#   FUZZ_SECONDS=N       seconds per fuzz harness (default 20)
#   THINFS_POWERCUT_CUTS=N  cut points of the power-cut replay (default 200)
#
# CI keeps only the end of the output, so a failed step ends the run with its name and, for the
# Swift tests, the lines of every failed test and expectation.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's time is printed when it ends, and all of them in a summary at the end of the run (on
# failure too, just before the FAILED line, which stays last).
current="" current_start=$SECONDS times=()
step_done() {
  [[ -n $current ]] || return 0
  local took=$((SECONDS - current_start))
  echo "=== test.sh: $current ${1:-done} ($took s)"
  times+=("$(printf '%-24s %5d s%s' "$current" "$took" "${1:+  $1}")")
  current=""
}
time_summary() { echo "=== test.sh: time per step (total $SECONDS s)"; printf '    %s\n' "${times[@]}"; }
step() { step_done; current=$1 current_start=$SECONDS; echo "=== test.sh: $1"; }
fail() { step_done FAILED; time_summary; echo "=== test.sh: FAILED at step '$1'${2:+: $2}" >&2; exit 1; }

step "setup";  scripts/setup.sh || fail setup "scripts/setup.sh could not install the packages"
step "build";  swift build --build-tests || fail build "swift build --build-tests failed (the compiler's errors are above)"

step "swift test"
log=$(mktemp /tmp/thinfs-swift-test.XXXXXX.log)
set +e
# The RBD tests run in the 'ceph rbd' step below, against a cluster that step owns.
THINFS_CEPH=off swift test --skip-build 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
  echo "=== test.sh: swift test failed (exit $rc); the failed tests and expectations:"
  # Swift Testing marks a failed test or expectation with ✘; XCTest says 'error:' or 'failed'.
  grep -E '✘|error:|Fatal error|signal [0-9]+|Test Case .* failed' "$log" | tail -n 60 | sed 's/^/    /'
  fail "swift test" "exit $rc (full log: $log)"
fi
rm -f "$log"

step "containerd end to end"
# ThinFS as a private containerd's proxy snapshotter, through a local registry, with faults
# (scripts/containerd-e2e.sh: about 45 s, under 3 min on a loaded machine); skips with the reason without root, /dev/fuse or a
# package. Its last line names the failed check; the bound leaves it time to clean up.
log=$(mktemp /tmp/thinfs-containerd-e2e.XXXXXX.log)
set +e
timeout -k 60 300 bash scripts/containerd-e2e.sh 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
  failed=$(grep -o "FAILED at check.*" "$log" | tail -n 1)
  fail "containerd end to end" "${failed:-exit $rc, timed out or killed} (full log: $log)"
fi
rm -f "$log"

step "docker plugin"
# thinfs serve --docker-plugin under a private dockerd 20.10 (scripts/docker-e2e.sh, ~16 s), then
# moby's graphtest suite through moby's plugin client (scripts/docker-graphtest.sh, ~20 s plus a
# ~15 s Go build); each skips with its reason without root, /dev/fuse or a package. The bounds
# (4 min in all) leave each time to clean up.
timeout -k 30 120 bash scripts/docker-e2e.sh || fail "docker plugin" "scripts/docker-e2e.sh exit $? (its FAILED line above names the check; 124: timed out)"
timeout -k 30 90 bash scripts/docker-graphtest.sh || fail "docker plugin" "scripts/docker-graphtest.sh exit $? (moby's graphtest: the failed tests above are marked --- FAIL; 124: timed out)"

step "thinfs compare"
# `thinfs compare --quick` on the test image, its report checked, then a run stopped by SIGTERM
# (scripts/compare/ci-compare.sh; under 3 minutes on an idle machine).
timeout -k 60 600 bash scripts/compare/ci-compare.sh .build/debug/thinfs || fail "thinfs compare" "scripts/compare/ci-compare.sh exit $? (its FAILED line above says what)"
step "ceph rbd"
# The RBD pool backend (issue 16) against a throw-away single-node cluster (scripts/ceph/cluster.sh:
# ceph-mon and ceph-osd on memstore, 127.0.0.1), stopped by PID and removed on any exit.
# Budget: under 5 minutes with the cluster's start. Includes, run alongside, "RBD two hosts" (two
# stores, one catalogue: shared layers, the exclusive lock, SIGKILL then takeover; ~25-40 s),
# "RBD two hosts in network namespaces" (the same across a veth into a namespace of its own, with
# a cluster of its own on the veth's address; ~30 s) and "RBD forget a departed store" (~15 s).
# Then containerd end to end on an RBD store (scripts/containerd-e2e.sh with
# THINFS_E2E_BACKEND=rbd against this cluster; 60-100 s on a loaded machine).
ceph_dir=$(mktemp -u /tmp/thinfs-ceph.XXXXXX)
log=$(mktemp /tmp/thinfs-ceph-rbd.XXXXXX.log)
ceph_stop() { bash scripts/ceph/cluster.sh stop "$ceph_dir"; }
trap ceph_stop EXIT
ceph_conf=$(bash scripts/ceph/cluster.sh start "$ceph_dir" rbd) \
  || fail "ceph rbd" "the test cluster did not start (scripts/ceph/cluster.sh; its log is above)"
set +e
THINFS_CEPH_CONF=$ceph_conf timeout 240 swift test --skip-build --filter 'RBD' 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# A test process killed by the bound cannot run its cleanup: the network namespaces of
# "RBD two hosts in network namespaces" go here, what runs in them first (by PID; their veths go
# with them).
for netns in $(ip netns list 2>/dev/null | awk '$1 ~ /^thinfs-hostb-/ {print $1}'); do
  for pid in $(ip netns pids "$netns"); do kill -KILL "$pid" 2>/dev/null; done
  ip netns del "$netns"
done
e2e_log=$(mktemp /tmp/thinfs-containerd-e2e-rbd.XXXXXX.log)
e2e_rc=0
if ((rc == 0)); then
  THINFS_E2E_BACKEND=rbd THINFS_CEPH_CONF=$ceph_conf timeout -k 60 240 bash scripts/containerd-e2e.sh 2>&1 | tee "$e2e_log"
  e2e_rc=${PIPESTATUS[0]}
fi
set -e
ceph_stop
trap - EXIT
if ((rc != 0)); then
  grep -E '✘|error:|Fatal error|signal [0-9]+' "$log" | tail -n 40 | sed 's/^/    /'
  fail "ceph rbd" "swift test --filter RBD exited $rc (timeout is 124; full log: $log)"
fi
grep -q 'Ceph RBD tests skipped' "$log" && fail "ceph rbd" "the RBD tests skipped although the cluster is up (see the reason above)"
if ((e2e_rc != 0)); then
  failed=$(grep -o "FAILED at check.*" "$e2e_log" | tail -n 1)
  fail "ceph rbd" "containerd end to end on RBD: ${failed:-exit $e2e_rc, timed out or killed} (full log: $e2e_log)"
fi
grep -q '^containerd-e2e: skipped (' "$e2e_log" && fail "ceph rbd" "containerd end to end on RBD skipped although the cluster is up (the reason is above)"
rm -f "$log" "$e2e_log"

step "containerd conformance"
# containerd's snapshotter conformance suite against thinfs serve (Tests/ContainerdConformance,
# ~35 s plus a ~30 s cold Go build): every subtest must pass. Skips with the reason without root,
# /dev/fuse or the Go packages. Its last lines name the failed subtests, each with its first error;
# the suite's own timeout (170 s) ends a hang with a goroutine dump, inside the bound.
THINFS=$(swift build --show-bin-path)/thinfs TIMEOUT=170s timeout -k 30 240 bash scripts/containerd-conformance.sh \
  || fail "containerd conformance" "exit $? (the failed subtests are listed above; 124: timed out)"

step "fuzz"
# libFuzzer harnesses (Fuzz/README.md) after an AddressSanitizer build: each replays its checked-in
# corpus (seeds and every earlier finding), which must run clean, then explores for 20 s with
# -seed=1; crashes found exploring are listed as NEW FINDINGS at the end (FUZZ_STRICT=1 makes them
# fail the step). The output ends with each crashing harness and its saved input.
scripts/fuzz.sh || fail "fuzz" "a harness crashed or the harnesses did not build (the lines above name the harness and the input)"

step "power cuts"
# Seeded (scripts/powercut.sh, about 100 s for 200 cut points); the seed, the cut point and the failed
# check end the output. The bound leaves it time to clean up.
timeout -k 30 360 bash scripts/powercut.sh || fail "power cuts" "scripts/powercut.sh exit $? (124: timed out; otherwise its last lines above name the seed, the cut point and the failed check)"

step "rootless"
# A fresh uid without root runs init, image import, create-rw and mount on the userspace pool
# through fusermount3; the kernel backends are refused and device nodes are inert (nodev), each
# saying why; thin_check and e2fsck clean (scripts/rootless.sh, about 30 s; skips with the reason
# without root, /dev/fuse or a tool). Its last line names the failed check.
timeout -k 30 180 bash scripts/rootless.sh || fail "rootless" "scripts/rootless.sh exit $? (124: timed out; otherwise its FAILED line above names the check)"

step "kernel VM suite"
# The kernel suite in a qemu guest (scripts/vm/README.md); skips loudly without qemu. It prints its
# own table and the end of each failed test's log last.
# --bin: the binaries every other step used; without it suite.sh runs `swift build --product`, which
# recompiled SwiftProtobuf and relinked thinfs after the --build-tests build (18 s in ci-run7b).
bash scripts/vm/suite.sh --bin "$(swift build --show-bin-path)" || fail "kernel VM suite" "exit $? (the table above names the failed tests)"
step_done
time_summary
echo "=== test.sh: all steps passed"
