#!/bin/bash
# make-test-image.sh OUTDIR: builds, offline and deterministically, a small two-layer test image.
#
#   layer 1: a busybox-static rootfs: /bin/busybox plus applet symlinks, /etc files, a hard link,
#            a fifo, two device nodes, a file with security.capability and user.* xattrs, a directory
#            with an xattr, files owned by 1000:1000 and a set-user-ID file.
#   layer 2: adds files (with a hard link pair), changes files and a directory's mode, deletes a file
#            and a directory (.wh.NAME whiteouts), and makes /var/lib/app opaque (.wh..wh..opq).
#
# Output in OUTDIR:
#   layer1.tar layer2.tar   the uncompressed layer tars (GNU tar, pax, --xattrs --numeric-owner, sorted)
#   oci/                    an OCI image layout: layer 1 gzip, layer 2 zstd
#   docker.tar              a `docker save` archive (manifest.json, config, <id>/layer.tar)
#   expected.env            DIFF_ID_1/2, CHAIN_ID_1/2, BLOB_1/2, CONFIG, all computed with sha256sum
#
# Needs root (device nodes, security.capability, ownership), busybox-static, GNU tar, gzip, zstd, python3.
set -euo pipefail

OUT=${1:?usage: make-test-image.sh OUTDIR}
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "make-test-image: $BUSYBOX missing (apt-get install busybox-static)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "make-test-image: run as root (device nodes, security.capability)" >&2; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# Sets an xattr without the attr package: setxattr PATH NAME HEXVALUE.
setxattr() { python3 -c 'import os,sys; os.setxattr(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), follow_symlinks=False)' "$@"; }
hex() { printf '%s' "$1" | od -An -tx1 | tr -d ' \n'; }

# Every mtime is fixed (with nanoseconds) so the tars are byte-for-byte reproducible.
stamp() { find "$1" -depth -exec touch -h -d @1700000000.123456789 {} +; }

# GNU tar, deterministic: sorted names, numeric owners, no atime/ctime, fixed pax header names.
mktar() {
    tar --create --file "$2" --directory "$1" --format=pax --xattrs --xattrs-include='*' --numeric-owner \
        --sort=name --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime .
}

# ---- layer 1: busybox rootfs
l1=$work/layer1
mkdir -p "$l1"/{bin,sbin,etc,dev,tmp,root,home/user,var/lib/app/cache,usr/share/doc/old,usr/bin}
install -m 0755 "$BUSYBOX" "$l1/bin/busybox"
for applet in sh ash cat ls cp mv rm mkdir echo grep sed sort stat touch ln id uname wc head tail true false; do
    ln -s busybox "$l1/bin/$applet"
done
ln -s ../bin/busybox "$l1/sbin/init"
ln -s /bin/busybox "$l1/usr/bin/env"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' > "$l1/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' > "$l1/etc/group"
printf 'thinfs-test\n' > "$l1/etc/hostname"
ln "$l1/etc/hostname" "$l1/etc/hostname.link"          # a hard link
printf 'ThinFS test image\n' > "$l1/etc/issue"
printf 'NAME="thinfs-test"\nID=thinfs\n' > "$l1/etc/os-release"
printf 'old documentation\n' > "$l1/usr/share/doc/old/README"
printf 'cached\n' > "$l1/var/lib/app/cache/blob"
printf 'setting=1\n' > "$l1/var/lib/app/app.conf"
printf 'hello from user\n' > "$l1/home/user/notes.txt"
chown -R 1000:1000 "$l1/home/user"
chmod 0750 "$l1/home/user"
mkfifo -m 0640 "$l1/tmp/fifo"
chmod 1777 "$l1/tmp"
chmod 0700 "$l1/root"
mknod -m 0666 "$l1/dev/null" c 1 3
mknod -m 0660 "$l1/dev/loop7" b 7 7
# A "ping": the busybox binary again, set-user-ID clear, with cap_net_raw+ep (VFS_CAP_REVISION_2:
# magic_etc 0x02000001, permitted 1<<13, inheritable 0) and a user xattr.
cp "$l1/bin/busybox" "$l1/bin/ping"
setxattr "$l1/bin/ping" security.capability 0100000200200000000000000000000000000000
setxattr "$l1/bin/ping" user.origin "$(hex busybox-static)"
printf '#!/bin/sh\necho su\n' > "$l1/bin/fake-su"
chmod 4755 "$l1/bin/fake-su"
setxattr "$l1/etc" user.dir "$(hex layer1)"
stamp "$l1"
mktar "$l1" "$OUT/layer1.tar"

# ---- layer 2: changes against layer 1, as a layer tar records them
l2=$work/layer2
mkdir -p "$l2"/{etc,bin,home/user,usr/share/doc,var/lib/app}
# Directory entries carry layer 1's metadata, except where the change is the point.
chmod 0755 "$l2/etc" "$l2/bin" "$l2/usr" "$l2/usr/share" "$l2/usr/share/doc" "$l2/var" "$l2/var/lib" "$l2/var/lib/app"
chown 1000:1000 "$l2/home/user"
chmod 0700 "$l2/home/user"                              # changed mode
printf 'thinfs-test-2\n' > "$l2/etc/hostname"            # changed: breaks the link with hostname.link
printf 'root:x:0:\nuser:x:1000:\nstaff:x:50:user\n' > "$l2/etc/group"   # changed
printf 'Welcome\n' > "$l2/etc/motd"                      # added
setxattr "$l2/etc/motd" user.note "$(hex added-in-layer-2)"
: > "$l2/etc/.wh.issue"                                 # deleted file
: > "$l2/usr/share/doc/.wh.old"                         # deleted directory
printf 'new doc\n' > "$l2/usr/share/doc/new.txt"
ln "$l2/usr/share/doc/new.txt" "$l2/usr/share/doc/new.link"   # a hard link pair inside the layer
ln -s busybox "$l2/bin/vi"                               # added symlink
: > "$l2/var/lib/app/.wh..wh..opq"                      # opaque: layer 1's app.conf and cache/ go
printf 'setting=2\n' > "$l2/var/lib/app/app.conf"
mkdir "$l2/var/lib/app/state"
printf 'fresh\n' > "$l2/var/lib/app/state/db"
printf 'more notes\n' > "$l2/home/user/more.txt"
chown 1000:1000 "$l2/home/user/more.txt"
stamp "$l2"
touch -h -d @1700001000.5 "$l2/etc/hostname"            # a different nanosecond mtime
mktar "$l2" "$OUT/layer2.tar"

sha() { sha256sum "$1" | cut -d' ' -f1; }
d1=$(sha "$OUT/layer1.tar")
d2=$(sha "$OUT/layer2.tar")
c2=$(printf 'sha256:%s sha256:%s' "$d1" "$d2" | sha256sum | cut -d' ' -f1)

# ---- OCI image layout: layer 1 gzip, layer 2 zstd
oci=$OUT/oci
rm -rf "$oci"
mkdir -p "$oci/blobs/sha256"
gzip -n -9 -c "$OUT/layer1.tar" > "$work/l1.gz"
zstd -q -19 -c "$OUT/layer2.tar" > "$work/l2.zst"
b1=$(sha "$work/l1.gz"); s1=$(stat -c %s "$work/l1.gz"); mv "$work/l1.gz" "$oci/blobs/sha256/$b1"
b2=$(sha "$work/l2.zst"); s2=$(stat -c %s "$work/l2.zst"); mv "$work/l2.zst" "$oci/blobs/sha256/$b2"
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' \
    "$d1" "$d2" > "$work/config.json"
cfg=$(sha "$work/config.json"); cs=$(stat -c %s "$work/config.json")
cp "$work/config.json" "$oci/blobs/sha256/$cfg"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s},{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:%s","size":%s}]}' \
    "$cfg" "$cs" "$b1" "$s1" "$b2" "$s2" > "$work/manifest.json"
man=$(sha "$work/manifest.json"); ms=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$oci/blobs/sha256/$man"
printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"thinfs-test:latest"}}]}' \
    "$man" "$ms" > "$oci/index.json"

# ---- docker save archive: uncompressed layer.tar per layer directory, manifest.json last
ds=$work/docker
mkdir -p "$ds/$d1" "$ds/$d2"
cp "$OUT/layer1.tar" "$ds/$d1/layer.tar"
cp "$OUT/layer2.tar" "$ds/$d2/layer.tar"
printf '1.0' > "$ds/$d1/VERSION"; printf '1.0' > "$ds/$d2/VERSION"
cp "$work/config.json" "$ds/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["thinfs-test:latest"],"Layers":["%s/layer.tar","%s/layer.tar"]}]' \
    "$cfg" "$d1" "$d2" > "$ds/manifest.json"
printf '{"thinfs-test":{"latest":"%s"}}' "$d2" > "$ds/repositories"
find "$ds" -depth -exec touch -h -d @1700000000 {} +
tar --create --file "$OUT/docker.tar" --directory "$ds" --format=ustar --numeric-owner --owner=0 --group=0 --sort=name \
    "$d1" "$d2" "$cfg.json" repositories manifest.json

cat > "$OUT/expected.env" <<EOF
DIFF_ID_1=sha256:$d1
DIFF_ID_2=sha256:$d2
CHAIN_ID_1=sha256:$d1
CHAIN_ID_2=sha256:$c2
BLOB_1=sha256:$b1
BLOB_2=sha256:$b2
CONFIG=sha256:$cfg
EOF
echo "make-test-image: $OUT (layers sha256:$d1 sha256:$d2, chain sha256:$c2)"
