#!/bin/sh
# Regenerates Sources/ThinFSContainerd/Generated from the .proto files next to it.
#
# The Swift code is generated once and committed, so a build needs neither protoc nor the
# plugins. To regenerate (after editing a .proto), build the two plugins outside the repository
# from the versions Package.resolved names, once; it takes minutes:
#
#   git clone https://github.com/grpc/grpc-swift-protobuf /var/tmp/protoc-plugins/gsp
#   cd /var/tmp/protoc-plugins/gsp && git checkout 2.4.1
#   swift build -c release --product protoc-gen-grpc-swift-2
#   swift build -c release --product protoc-gen-swift
#
# then run this script (PLUGINS names their directory). protoc: apt-get install protobuf-compiler.
set -eu
cd "$(dirname "$0")/.."
PLUGINS=${PLUGINS:-/var/tmp/protoc-plugins/gsp/.build/release}
PROTO=Sources/ThinFSContainerd/Proto
OUT=Sources/ThinFSContainerd/Generated
for p in protoc-gen-swift protoc-gen-grpc-swift-2; do
    [ -x "$PLUGINS/$p" ] || { echo "gen-proto.sh: $PLUGINS/$p is missing; see the comment at the top" >&2; exit 1; }
done
command -v protoc >/dev/null || { echo "gen-proto.sh: protoc is missing (apt-get install protobuf-compiler)" >&2; exit 1; }
rm -f "$OUT"/*.swift
# Public: the daemon (another module) and the tests use the types.
protoc -I "$PROTO" -I /usr/include \
    --plugin=protoc-gen-swift="$PLUGINS/protoc-gen-swift" \
    --plugin=protoc-gen-grpc-swift="$PLUGINS/protoc-gen-grpc-swift-2" \
    --swift_opt=Visibility=Public --swift_out="$OUT" \
    --grpc-swift_opt=Visibility=Public,Client=true,Server=true --grpc-swift_out="$OUT" \
    "$PROTO"/containerd_mount.proto "$PROTO"/containerd_snapshots.proto
# protoc-gen-grpc-swift-2 writes an empty file for a .proto without services.
rm -f "$OUT"/containerd_mount.grpc.swift
ls "$OUT"
