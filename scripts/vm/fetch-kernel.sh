#!/usr/bin/env bash
# Fetches the Debian kernel the guest boots, into a cache (never /boot), and prepares it:
#   - `apt-get download` the linux-image-6.1.0-*-amd64 that linux-image-amd64 depends on;
#   - `dpkg-deb -x` it into $CACHE/<version>/root;
#   - generate modules.dep (the package ships none) with `busybox depmod -b`;
#   - extract the uncompressed vmlinux from the bzImage: qemu boots an ELF vmlinux through its
#     PVH entry note, skipping the decompressor (about 5 s under TCG).
# Idempotent: a complete cache entry is reused. Prints the directory of the cache entry, which holds
#   vmlinux, version (the uname -r), root/lib/modules/<version>/...
# Environment: THINFS_VM_CACHE (default /var/cache/thinfs-vm), THINFS_VM_KERNEL_PACKAGE (override the package).
set -euo pipefail

cache=${THINFS_VM_CACHE:-/var/cache/thinfs-vm}
mkdir -p "$cache"

log() { echo "fetch-kernel: $*" >&2; }

package=${THINFS_VM_KERNEL_PACKAGE:-}
if [[ -z $package ]]; then
  # The package linux-image-amd64 depends on; refresh the lists once if apt does not know it.
  pick() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
  package=$(pick || true)
  if [[ -z $package ]]; then
    log "apt does not know linux-image-amd64; running apt-get update"
    apt-get update -qq >&2
    package=$(pick)
  fi
fi
[[ $package =~ ^linux-image-(.+)$ ]] || { log "cannot determine the kernel package (got '$package')"; exit 1; }
version=${BASH_REMATCH[1]}
[[ $version == *-unsigned ]] && version=${version%-unsigned}
entry="$cache/$version"

if [[ -f $entry/.complete ]]; then
  echo "$entry"
  exit 0
fi

rm -rf "$entry.tmp"
mkdir -p "$entry.tmp/deb"
log "downloading $package into $entry"
# apt drops to the _apt user for downloads; let it write here (no "unsandboxed" warning).
chown _apt "$entry.tmp/deb" 2>/dev/null || true
(cd "$entry.tmp/deb" && apt-get download "$package" >&2) || {
  log "apt-get download $package failed; running apt-get update and retrying"
  apt-get update -qq >&2
  (cd "$entry.tmp/deb" && apt-get download "$package" >&2)
}
dpkg-deb -x "$entry.tmp"/deb/*.deb "$entry.tmp/root"
rm -rf "$entry.tmp/deb"

moddir="$entry.tmp/root/lib/modules/$version"
[[ -d $moddir ]] || { log "no $moddir in $package"; exit 1; }
bzimage="$entry.tmp/root/boot/vmlinuz-$version"
[[ -f $bzimage ]] || { log "no $bzimage in $package"; exit 1; }

# Debian 6.1 ships modules uncompressed (*.ko); busybox depmod reads those.
busybox depmod -b "$entry.tmp/root" "$version"
[[ -s $moddir/modules.dep ]] || { log "depmod produced no modules.dep"; exit 1; }

# The bzImage's payload: setup sectors (setup_sects, byte 0x1f1; 0 means 4), then the protected-mode
# part, whose header gives payload_offset (0x248) and payload_length (0x24c) of the compressed vmlinux.
# The kernel's build appends the decompressed size (4 bytes) to the compressed stream: drop it.
u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' '; }
setup_sects=$(u8 "$bzimage" $((0x1f1))); ((setup_sects)) || setup_sects=4
payload_offset=$(u32 "$bzimage" $((0x248)))
payload_length=$(u32 "$bzimage" $((0x24c)))
dd if="$bzimage" of="$entry.tmp/vmlinux.compressed" iflag=skip_bytes,count_bytes status=none \
  skip=$(((setup_sects + 1) * 512 + payload_offset)) count=$((payload_length - 4))
payload="$entry.tmp/vmlinux.compressed"
magic=$(od -An -tx1 -N6 "$payload" | tr -d ' ')
case $magic in
  28b52ffd*) zstd -dq "$payload" -o "$entry.tmp/vmlinux" ;;
  1f8b*)     gzip -dc "$payload" > "$entry.tmp/vmlinux" ;;
  fd377a585a00) xz -dc "$payload" > "$entry.tmp/vmlinux" ;;
  5d0000*)   xz -dc --format=lzma "$payload" > "$entry.tmp/vmlinux" ;;
  *) log "unknown kernel payload compression (magic $magic)"; exit 1 ;;
esac
rm -f "$payload"
[[ $(od -An -tx1 -N4 "$entry.tmp/vmlinux" | tr -d ' ') == 7f454c46 ]] || { log "extracted vmlinux is not ELF"; exit 1; }

echo "$version" > "$entry.tmp/version"
echo "$package" > "$entry.tmp/package"
touch "$entry.tmp/.complete"
rm -rf "$entry"
mv "$entry.tmp" "$entry"
log "kernel $version ready in $entry"
echo "$entry"
