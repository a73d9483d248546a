#!/usr/bin/env bash
# Installs every Debian package ThinFS needs to build, test and demo. Idempotent:
# packages already present are not touched, and apt runs only when one is missing.
set -euo pipefail

packages=(
  pkg-config
  libfuse3-dev fuse3            # FUSE server (thinfs-mount)
  libdevmapper-dev lvm2         # kernel pool backend, direct-lvm setup
  libext2fs-dev e2fsprogs       # ext4 through libext2fs; mke2fs, e2fsck
  libarchive-dev                # layer tars
  thin-provisioning-tools       # thin_check / thin_dump / thin_restore: the metadata oracle
  libsqlite3-dev                # layer store metadata
  libre2-dev                    # containerd filter patterns (~=), Go regexp syntax, linear time
  busybox-static zstd           # test images (a busybox rootfs, zstd layers); the VM initramfs
  qemu-system-x86               # the kernel test guest (scripts/vm)
  containerd runc docker-registry skopeo   # scripts/containerd-e2e.sh: a private containerd, a local registry
  docker.io curl golang-go golang-github-docker-docker-dev golang-github-vbatts-tar-split-dev  # Docker plugin: private dockerd, the plugin tests' HTTP client, moby's graphtest
  python3-matplotlib fio fuse-overlayfs file   # thinfs compare: its plots, I/O workloads, a setup; file(1) checks its PNGs
  golang-github-containerd-containerd-dev   # containerd's snapshotter conformance suite (Tests/ContainerdConformance)
  debootstrap                   # scripts/compare/make-rootfs-image.sh: the debootstrap-sized image of thinfs compare's containerd figures
  librbd-dev librados-dev ceph-mon ceph-osd ceph-common  # RBD pool backend; its test cluster (scripts/ceph)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "setup: all packages present"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
