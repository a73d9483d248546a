#!/bin/sh
# containerd's snapshotter conformance suite against `thinfs serve --containerd-socket`
# (Tests/ContainerdConformance). Needs root, /dev/fuse, and Debian's golang-go and
# golang-github-containerd-containerd-dev (GOPATH mode, offline). Skips with a message when
# they are missing. Status: it builds and runs; not yet passing, so not part of CI. First run:
# Basic fails its directory diff (a fresh ext4 has lost+found; the suite expects an empty
# root), and a subtest then hangs until the suite's timeout (not yet diagnosed).
set -eu
cd "$(dirname "$0")/.."
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]; then
    echo "containerd-conformance: skipped (apt-get install golang-go golang-github-containerd-containerd-dev)"; exit 0
fi
[ "$(id -u)" = 0 ] && [ -e /dev/fuse ] || { echo "containerd-conformance: skipped (needs root and /dev/fuse)"; exit 0; }
swift build --product thinfs
THINFS=$(swift build --show-bin-path)/thinfs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp Tests/ContainerdConformance/conformance_test.go "$work/"
(cd "$work" && GOPATH=/usr/share/gocode GO111MODULE=off go test -c -o conformance.test .)
THINFS="$THINFS" "$work/conformance.test" -test.v -test.timeout "${TIMEOUT:-600s}" "$@"
