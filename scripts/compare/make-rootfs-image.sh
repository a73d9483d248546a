#!/usr/bin/env bash
# make-rootfs-image.sh: a debootstrap-sized image for `thinfs compare --image` (issue 12, section 4:
# "image unpack time for a debootstrap-sized image").
#
#   scripts/compare/make-rootfs-image.sh OUT     writes OUT/oci, an OCI image layout
#
# The image is one layer: `debootstrap --variant=minbase bookworm` (about 210 MB and 6,800 entries
# uncompressed), gzipped as a registry serves it. The rootfs tar is made once and cached in
# $CACHE/bookworm-minbase.tar, the cache scripts/compare/layer-bench.sh uses too; later runs only
# gzip it. Needs root and debootstrap (scripts/setup.sh installs it) and Debian's mirror the first
# time. Not for CI: the CI run uses the small busybox image of scripts/make-test-image.sh.
#   CACHE=DIR      the cache directory (default /var/cache/thinfs-bench)
#   MIRROR=URL     the Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail
out=${1:?usage: make-rootfs-image.sh OUT}
CACHE=${CACHE:-/var/cache/thinfs-bench}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
say() { echo "make-rootfs-image: $*" >&2; }
[[ $(id -u) == 0 ]] || { say "needs root (debootstrap)"; exit 1; }
[[ ! -e $out/oci ]] || { say "$out/oci exists"; exit 1; }

tarball=$CACHE/bookworm-minbase.tar
if [[ ! -s $tarball ]]; then
    command -v debootstrap >/dev/null || { say "debootstrap is not installed (scripts/setup.sh installs it)"; exit 1; }
    mkdir -p "$CACHE"
    rm -rf "$CACHE/rootfs.tmp"
    say "debootstrap --variant=minbase bookworm into $CACHE/rootfs.tmp (a few minutes)"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        { say "debootstrap failed: $(tail -3 "$CACHE/debootstrap.log")"; exit 1; }
    # The same tar layer-bench.sh makes, so that either script fills the cache for the other.
    tar --create --file "$tarball.tmp" --directory "$CACHE/rootfs.tmp" --format=pax \
        --xattrs --xattrs-include='*' --numeric-owner --sort=name .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$CACHE/rootfs.tmp"
fi

oci=$out/oci
mkdir -p "$oci/blobs/sha256"
sha() { sha256sum "$1" | cut -d' ' -f1; }
diff_id=$(sha "$tarball")
gzip -n -c "$tarball" >"$out/layer.gz"
blob=$(sha "$out/layer.gz")
size=$(stat -c %s "$out/layer.gz")
mv "$out/layer.gz" "$oci/blobs/sha256/$blob"
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/bash"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff_id" >"$out/config.json"
cfg=$(sha "$out/config.json"); cfg_size=$(stat -c %s "$out/config.json"); mv "$out/config.json" "$oci/blobs/sha256/$cfg"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$cfg" "$cfg_size" "$blob" "$size" >"$out/manifest.json"
man=$(sha "$out/manifest.json"); man_size=$(stat -c %s "$out/manifest.json"); mv "$out/manifest.json" "$oci/blobs/sha256/$man"
printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"debian-minbase:bookworm"}}]}' \
    "$man" "$man_size" >"$oci/index.json"
say "$oci: debian bookworm minbase, 1 layer, $(stat -c %s "$tarball") bytes in $(tar -tf "$tarball" | wc -l) entries, $size bytes gzip"
