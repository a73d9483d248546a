#!/bin/sh
# containerd's snapshotter conformance suite against `thinfs serve --containerd-socket`
# (Tests/ContainerdConformance). Needs root, /dev/fuse, and Debian's golang-go and
# golang-github-containerd-containerd-dev (GOPATH mode, offline). Skips with a message when
# they are missing. Status: it builds; a first run did not finish within 300 s (not yet
# diagnosed), so it is not part of CI.
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
