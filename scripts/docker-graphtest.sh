#!/bin/sh
# moby's graphdriver suite (daemon/graphdriver/graphtest) against `thinfs serve --docker-plugin`
# through moby's plugin client (Tests/DockerGraphtest). Needs root, /dev/fuse, and Debian's
# golang-go, golang-github-docker-docker-dev and golang-github-vbatts-tar-split-dev (GOPATH mode,
# offline). Skips with a message when they are missing. THINFS=path picks the binary.
set -eu
cd "$(dirname "$0")/.."
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/docker/docker/daemon/graphdriver/graphtest ] \
    || [ ! -d /usr/share/gocode/src/github.com/vbatts/tar-split ]; then
    echo "docker-graphtest: skipped (apt-get install golang-go golang-github-docker-docker-dev golang-github-vbatts-tar-split-dev)"; exit 0
fi
[ "$(id -u)" = 0 ] && [ -e /dev/fuse ] || { echo "docker-graphtest: skipped (needs root and /dev/fuse)"; exit 0; }
THINFS=${THINFS:-$(swift build --show-bin-path)/thinfs}
[ -x "$THINFS" ] || { echo "docker-graphtest: $THINFS missing (swift build first)" >&2; exit 1; }
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp Tests/DockerGraphtest/graphtest_test.go "$work/"
# GOPATH mode knows no module major versions: Debian's gotest.tools is v3, imported as gotest.tools/v3.
mkdir -p "$work/gopath/src/gotest.tools"
ln -s /usr/share/gocode/src/gotest.tools "$work/gopath/src/gotest.tools/v3"
# Then the stubs: only the two packages Debian's package leaves out.
(cd "$work" && GOPATH="$work/gopath:$repo/Tests/DockerGraphtest/stubs:/usr/share/gocode" GO111MODULE=off \
    go test -c -o graphtest.test .) || { echo "docker-graphtest: FAILED: the Go build failed (above)" >&2; exit 1; }
THINFS="$THINFS" "$work/graphtest.test" -test.v -test.timeout "${TIMEOUT:-300s}" "$@"
