#!/usr/bin/env bash
# containerd's snapshotter conformance suite (containerd 1.6's snapshots/testsuite) against
# `thinfs serve --containerd-socket`, through containerd's proxy client: Tests/ContainerdConformance,
# one fresh serve and root per subtest. Built offline in GOPATH mode from Debian's golang-go and
# golang-github-containerd-containerd-dev. Needs root and /dev/fuse; skips with the reason when
# something is missing. The suite skips Rename itself ("rename test still fails on some kernels").
#   THINFS=PATH     the thinfs binary (default: swift build --product thinfs)
#   TIMEOUT=600s    the suite's own timeout (go test -timeout): a hang ends in a goroutine dump
# Extra arguments go to the test binary (for example -test.run 'TestThinFS/Basic$').
# The last lines name the failed subtests with their first error.
set -euo pipefail
cd "$(dirname "$0")/.."

suite=/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite
if ! command -v go >/dev/null || [[ ! -d $suite ]]; then
  echo "containerd-conformance: SKIPPED: needs golang-go and golang-github-containerd-containerd-dev (scripts/setup.sh)"; exit 0
fi
if [[ $(id -u) -ne 0 || ! -e /dev/fuse ]]; then
  echo "containerd-conformance: SKIPPED: needs root and /dev/fuse"; exit 0
fi

if [[ -z ${THINFS:-} ]]; then
  swift build --product thinfs
  THINFS=$(swift build --show-bin-path)/thinfs
fi
work=$(mktemp -d /tmp/thinfs-conformance.XXXXXX)
# The suite's directories are made in TMPDIR=$work: whatever a killed run left mounted there
# (serve dies with the test binary) is detached before the directory goes.
cleanup() {
  awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$(printf '%b' "$m")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
cp Tests/ContainerdConformance/conformance_test.go "$work/"
started=$(date +%s)
(cd "$work" && GOPATH=/usr/share/gocode GO111MODULE=off go test -c -o conformance.test .) \
  || { echo "containerd-conformance: FAILED: the Go harness did not build (go's errors are above)"; exit 1; }
echo "containerd-conformance: harness built in $(($(date +%s) - started)) s"

log=$work/conformance.log
set +e
TMPDIR=$work THINFS="$THINFS" "$work/conformance.test" -test.v -test.timeout "${TIMEOUT:-600s}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo "containerd-conformance: ran in $(($(date +%s) - started)) s"
if ((rc != 0)); then
  echo "containerd-conformance: FAILED (exit $rc). Failed subtests, each with its first error:"
  # go test -v: "--- FAIL: TestThinFS/NAME (Ns)", and the subtest's messages indented under
  # "=== CONT  TestThinFS/NAME" (the subtests run in parallel, so their lines interleave).
  for name in $(sed -n 's/^ *--- FAIL: TestThinFS\/\([^ ]*\).*/\1/p' "$log"); do
    first=$(awk -v t="TestThinFS/$name" '$1 == "===" { cur = $3; next } cur == t && /^    (testsuite|issues|conformance_test)\.go:[0-9]+: / { print; exit }' "$log")
    first=${first#"${first%%[![:space:]]*}"}
    echo "    $name: ${first:-(its messages are in the log above)}"
  done
  grep -E '^panic: test timed out' "$log" | sed 's/^/    /' || true
  exit "$rc"
fi
echo "containerd-conformance: every subtest passed ($(grep -c -- '--- PASS: TestThinFS/' "$log") passed, $(grep -c -- '--- SKIP: TestThinFS/' "$log") skipped by the suite)"
