#!/usr/bin/env bash
# ThinFS without root (issue 14, §5): a user with a fresh uid (4242, HOME in a directory of their
# own) runs `thinfs init`, `image import`, `layer create-rw` and `mount` on the userspace pool,
# mounting through the setuid fusermount3 with nothing setuid of ours; what needs root is
# refused or degraded with a message that says so:
#   - the kernel backends (loop, dm.thinpooldev): refused, "device-mapper needs root";
#   - an image's device nodes and set-user-ID files are kept in the layer, but the mount is
#     nosuid,nodev (fusermount3 forces it), so a node does not open and the bit does nothing;
#   - allow_other needs user_allow_other in /etc/fuse.conf: without it a warning says that only
#     the user gets in.
# Then thin_check and e2fsck -fn, run as the user, are clean.
#
# Runs as root, which it needs only to make the user and a private mount namespace: there it
# binds over /etc/passwd a copy naming the uid (fusermount3 refuses a uid with no name) and, where
# /dev/fuse is not 0666 (as in many containers; udev makes it 0666 on a normal host), a 0666 node
# for the same device. Nothing of the host's changes. Skips with the reason without root,
# /dev/fuse or a tool. The last line names the failed check.
#   THINFS_BIN=DIR        the built thinfs and thinfs-mount (default: swift build --show-bin-path)
#   THINFS_ROOTLESS_UID=N the uid (default 4242; it must not have a passwd entry)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "=== rootless: $*"; }
skip() { say "SKIPPED: $1"; exit 0; }
fail() { echo "=== rootless: FAILED at check '$1'${2:+: $2}" >&2; exit 1; }

if [[ ${1:-} != --inner ]]; then
  [[ $(id -u) == 0 ]] || skip "needs root (to make the user with setpriv and a private mount namespace)"
  [[ -e /dev/fuse ]] || skip "no /dev/fuse"
  for tool in setpriv unshare fusermount3 e2fsck thin_check busybox tar sha256sum; do
    command -v "$tool" >/dev/null || skip "$tool is not installed"
  done
  uid=${THINFS_ROOTLESS_UID:-4242}
  getent passwd "$uid" >/dev/null && skip "uid $uid has a passwd entry; set THINFS_ROOTLESS_UID to a free one"
  bin=${THINFS_BIN:-$(swift build --show-bin-path)}
  [[ -x $bin/thinfs && -x $bin/thinfs-mount ]] || fail "binaries" "no thinfs and thinfs-mount in $bin (build first)"
  work=$(mktemp -d /tmp/thinfs-rootless.XXXXXX)
  chmod 755 "$work"
  cleanup() {
    # Whatever the user's daemons left: stopped by pid, then their mounts (the namespace's die
    # with its last process; these are found by their command lines naming the work directory).
    for p in /proc/[0-9]*; do
      if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q "$work/"; then kill "${p#/proc/}" 2>/dev/null || true; fi
    done
    sleep 1
    rm -rf "$work"
  }
  trap cleanup EXIT
  set +e
  THINFS_ROOTLESS_UID=$uid THINFS_BIN=$bin unshare --mount --propagation private bash "$0" --inner "$work"
  rc=$?
  set -e
  exit $rc
fi

# In the private mount namespace, as root until setpriv.
work=$2
uid=$THINFS_ROOTLESS_UID
bin=$THINFS_BIN
home=$work/home
mkdir -p "$home"
chown "$uid:$uid" "$home"
chmod 700 "$home"

cp /etc/passwd "$work/passwd"
echo "thinfs-rootless:x:$uid:$uid:ThinFS rootless test:$home:/bin/sh" >>"$work/passwd"
mount --bind "$work/passwd" /etc/passwd
if [[ $(stat -c %a /dev/fuse) != 666 ]]; then
  say "/dev/fuse is $(stat -c %a /dev/fuse) here; the user gets a 0666 node for it in this namespace, as udev gives on a normal host"
  mknod -m 666 "$work/fuse" c "$((16#$(stat -c %t /dev/fuse)))" "$((16#$(stat -c %T /dev/fuse)))"
  mount --bind "$work/fuse" /dev/fuse
fi

# Our binaries, copied where the user can run them: nothing setuid of ours.
mkdir "$work/bin"
cp "$bin/thinfs" "$bin/thinfs-mount" "$work/bin/"
chmod 755 "$work/bin"/*
[[ -z $(find "$work/bin" -perm /6000) ]] || fail "nothing setuid" "$(find "$work/bin" -perm /6000)"

# The test image, made by root (it holds device nodes), handed to the user.
bash scripts/make-test-image.sh "$work/image" >/dev/null || fail "test image" "scripts/make-test-image.sh failed"
chown -R "$uid:$uid" "$work/image"

as_user() {
  setpriv --reuid="$uid" --regid="$uid" --clear-groups \
    env -i HOME="$home" PATH="$work/bin:/usr/bin:/bin:/usr/sbin:/sbin" "$@"
}
out=$work/out
check() {  # check NAME COMMAND...: runs it as the user; its output is in $out
  local name=$1
  shift
  as_user "$@" >"$out" 2>&1 || fail "$name" "$(tail -n 5 "$out")"
}
refused() {  # refused NAME TEXT COMMAND...: must fail as the user, saying TEXT
  local name=$1 text=$2
  shift 2
  if as_user "$@" >"$out" 2>&1; then fail "$name" "succeeded without root: $(tail -n 3 "$out")"; fi
  grep -q -- "$text" "$out" || fail "$name" "the refusal does not say '$text': $(tail -n 3 "$out")"
}

store=$home/store
# The base filesystem's root belongs to the user (mke2fs -E root_owner: the caller's ids).
check "init" thinfs init --root "$store" --storage-opt dm.loopdatasize=1G --storage-opt dm.basesize=128M \
  --storage-opt dm.mkfsarg=-Eroot_owner
check "image import" thinfs image import --root "$store" "$work/image/oci"
top=$(grep -o 'sha256:[0-9a-f]*' "$out" | tail -n 1)
[[ -n $top ]] || fail "image import" "no chain id printed: $(cat "$out")"
check "layer create-rw" thinfs layer create-rw --root "$store" c1 --parent "$top"
check "layer create" thinfs layer create --root "$store" empty
check "layer create-rw (own files)" thinfs layer create-rw --root "$store" mine --parent empty
say "init, image import, create and create-rw as uid $uid"

mnt=$home/c1 mine=$home/mine
as_user mkdir "$mnt" "$mine"
check "mount" thinfs mount --root "$store" c1 "$mnt"
grep -q "user_allow_other" "$out" || grep -q user_allow_other /etc/fuse.conf \
  || fail "mount" "no word that other users are kept out without user_allow_other: $(cat "$out")"
line=$(grep " $mnt " /proc/self/mountinfo) || fail "mount" "$mnt is not in the mount table"
[[ $line == *"user_id=$uid"* && $line == *nosuid* && $line == *nodev* ]] || fail "mount" "not the user's nosuid,nodev mount: $line"
check "mount (own files)" thinfs mount --root "$store" mine "$mine"
say "mounted through fusermount3: $line"

# The image reads back; its device nodes and set-user-ID file are kept but inert.
want=$(tar -xOf "$work/image/layer1.tar" ./bin/busybox | sha256sum)
check "read as the user" sh -c "sha256sum < '$mnt/bin/busybox'"
[[ $(cat "$out") == "$want" ]] || fail "read" "bin/busybox differs from the image's"
check "device node kept" stat -c '%F %t:%T' "$mnt/dev/null"
[[ $(cat "$out") == "character special file 1:3" ]] || fail "device node kept" "$(cat "$out")"
refused "device node inert (nodev)" "Permission denied" sh -c "head -c 1 '$mnt/dev/null'"
check "set-user-ID bit kept" stat -c %a "$mnt/bin/fake-su"
[[ $(cat "$out") == 4755 ]] || fail "set-user-ID bit kept" "mode $(cat "$out")"
refused "the image's root-owned files" "Permission denied" sh -c "echo x > '$mnt/etc/motd'"

# The user's own layer: written, fsynced, unmounted, mounted again, read back.
check "write" sh -c "head -c 3000000 /dev/urandom > '$mine/file' && sync '$mine/file' && sha256sum < '$mine/file'"
sum=$(cat "$out")
check "umount" thinfs umount "$mnt"
check "umount (own files)" thinfs umount "$mine"
check "mount again" thinfs mount --root "$store" mine "$mine" --ro
check "read back" sh -c "sha256sum < '$mine/file'"
[[ $(cat "$out") == "$sum" ]] || fail "read back" "the file written before the umount differs"
check "umount again" thinfs umount "$mine"
for _ in $(seq 50); do
  pgrep -u "$uid" -f "$store" >/dev/null || break
  sleep 0.2
done
pgrep -u "$uid" -f "$store" >/dev/null && fail "daemon exit" "the user's daemon outlived its last mount"
grep -q "$work" /proc/self/mountinfo && grep "$work" /proc/self/mountinfo | grep -vq -e /etc/passwd -e /dev/fuse \
  && fail "no mount left" "$(grep "$work" /proc/self/mountinfo)"
say "wrote, unmounted and read back the user's own layer; the daemon exited"

# What needs root is refused, saying so.
refused "loop backend" "needs root" thinfs init --root "$home/loop" --storage-opt thinfs.backend=loop --storage-opt dm.loopdatasize=1G
refused "dm.thinpooldev" "needs root" thinfs init --root "$home/lvm" --storage-opt dm.thinpooldev=thinfs-rootless-pool
refused "kernel mount" "kernel pool" thinfs mount --root "$store" c1 "$mnt" --kernel
say "the kernel backends and kernel mounts are refused, naming root or the kernel pool"

# The oracles, as the user, on what the user made.
check "thin_check" thin_check "$store/pool/metadata"
for id in c1 mine; do
  check "layer ls" thinfs layer ls --root "$store" --json
  dev=$(python3 -c "import json,sys; print([r['deviceID'] for r in json.load(open(sys.argv[1])) if r['id']==sys.argv[2]][0])" "$out" "$id")
  check "dev read $id" sh -c "thinfs dev read --root '$store' $dev --length 128M > '$home/$id.img'"
  check "e2fsck -fn $id" e2fsck -fn "$home/$id.img"
  grep -q "Fix? no" "$out" && fail "e2fsck -fn $id" "$(cat "$out")"
  rm -f "$home/$id.img"
done
say "thin_check and e2fsck -fn clean"
say "passed"
