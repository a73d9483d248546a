#!/usr/bin/env bash
# Boots the test guest once and runs one script in it.
#
#   run.sh [options] SCRIPT [ARGS...]
#     --bin DIR        where thinfs and thinfs-mount are (builds the initramfs; default .build-vm/release)
#     --initramfs FILE use this initramfs instead of building one
#     --share DIR      host directory shared with the guest as /share (read-write, 9p); default: a
#                      temporary directory, removed afterwards
#     --disk SIZE      a sparse scratch disk of SIZE (e.g. 2G) as the guest's /dev/vda, for LVM;
#                      default 2G, 0 for none. Removed afterwards.
#     --drive NAME=FILE attach a host file as a virtio disk (repeatable); the guest finds it with
#                      `vm_disk NAME` (guest-lib.sh), by its virtio serial (NAME: at most 20 characters).
#                      Writes go to FILE. Use this for pool files: loop devices over 9p files move
#                      about 1 MB/s under TCG, virtio disks tens of MB/s.
#     --timeout SECS   power the guest off after SECS (default 600); exit status 124
#     --mem MIB        guest memory (default 2048)
#     --cpus N         guest CPUs (default: the host's, at most 4)
#     --log FILE       also keep the console log there
#     --quiet          do not stream the console to stdout
#
# SCRIPT is copied into the share and run by the guest's /init with bash (the host's), from /share,
# with ARGS. (Not busybox sh: it runs its own applets before PATH's real tools.)
# The exit status is SCRIPT's; 124 on timeout; 125 if the guest did not report one (panic, harness
# failure). The script's output is the console's (stdout), between the THINFS-VM-START and
# THINFS-VM-EXIT marker lines.
#
# The guest runs on TCG (-accel tcg,thread=multi -cpu max): this host's /dev/kvm is PVM, on which a
# stock kernel hangs. THINFS_VM_ACCEL=kvm overrides it on hosts where KVM works.
#
# Cleanup: qemu is killed by its PID (never by name) on exit, error, timeout, SIGINT and SIGTERM;
# loop devices and mounts only exist inside the guest and die with it; the scratch disk and the
# temporary share are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

drives=()
bin="$repo/.build-vm/release" initramfs="" share="" disk=2G timeout=600 mem=2048 log="" quiet=0
cpus=$(nproc); ((cpus > 4)) && cpus=4
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --initramfs) initramfs=$2; shift 2 ;;
    --share) share=$2; shift 2 ;;
    --disk) disk=$2; shift 2 ;;
    --drive) drives+=("$2"); shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --) shift; break ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
(($#)) || { sed -n '2,30p' "$0" >&2; exit 2; }
script=$1; shift
[[ -f $script ]] || { echo "run.sh: no script $script" >&2; exit 2; }
qemu=$(command -v qemu-system-x86_64) || { echo "run.sh: qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)" >&2; exit 125; }

entry=$("$here/fetch-kernel.sh")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/thinfs-vm.XXXXXX")
qpid="" tpid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
  fi
  if [[ -n $tpid ]]; then kill "$tpid" 2>/dev/null || true; wait "$tpid" 2>/dev/null || true; fi
  rm -rf "$tmp"
  return $rc
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted; stopping the guest" >&2; exit 130' INT
trap 'exit 143' TERM

if [[ -z $initramfs ]]; then
  initramfs=$("$here/build-initramfs.sh" --bin "$bin" --kernel "$entry" --out "$tmp/initramfs.cpio")
fi
if [[ -z $share ]]; then
  share="$tmp/share"
fi
mkdir -p "$share/.vm"
share=$(cd "$share" && pwd)
rm -f "$share/.vm/exit-status"
cp "$script" "$share/.vm/script.sh"
cp "$here/guest-lib.sh" "$share/.vm/lib.sh"
{
  echo '# written by run.sh'
  printf 'exec bash /share/.vm/script.sh'
  for a in "$@"; do printf ' %q' "$a"; done
  echo
} > "$share/.vm/run"

drive=()
if [[ $disk != 0 ]]; then
  truncate -s "$disk" "$tmp/scratch.img"
  drive=(-drive "file=$tmp/scratch.img,format=raw,if=none,id=scratch,cache=unsafe,discard=unmap"
         -device "virtio-blk-pci,drive=scratch,serial=thinfs-scratch")
fi

for d in "${drives[@]}"; do
  name=${d%%=*} file=${d#*=}
  [[ $d == *=* && -n $name && ${#name} -le 20 && -f $file ]] || { echo "run.sh: --drive wants NAME=FILE (NAME at most 20 characters, FILE a file): $d" >&2; exit 2; }
  drive+=(-drive "file=$file,format=raw,if=none,id=d-$name,cache=writeback,discard=unmap"
          -device "virtio-blk-pci,drive=d-$name,serial=$name")
done

accel=(-accel tcg,thread=multi -cpu max)
[[ ${THINFS_VM_ACCEL:-} == kvm ]] && accel=(-accel kvm -cpu host)

console="$tmp/console.log"
: > "$console"
start=$(date +%s%N)
# setpriv --pdeathsig: should this script itself be SIGKILLed (no trap runs), the kernel kills qemu too.
pdeath=(); setpriv --help 2>/dev/null | grep -q -- --pdeathsig && pdeath=(setpriv --pdeathsig KILL --)
"${pdeath[@]}" "$qemu" -nodefaults -no-user-config -machine pc "${accel[@]}" -smp "$cpus" -m "$mem" \
  -display none -serial "file:$console" -no-reboot \
  -kernel "$entry/vmlinux" -initrd "$initramfs" \
  -append "console=ttyS0 mitigations=off panic=-1 loglevel=4 rdinit=/init quiet" \
  -virtfs "local,path=$share,mount_tag=share,security_model=none,id=share" \
  "${drive[@]}" < /dev/null > "$tmp/qemu.out" 2>&1 &
qpid=$!
if ((!quiet)); then
  tail -n +1 -f --pid="$qpid" "$console" &
  tpid=$!
fi

timed_out=0
deadline=$(( $(date +%s) + timeout ))
while kill -0 "$qpid" 2>/dev/null; do
  if (( $(date +%s) >= deadline )); then
    timed_out=1
    echo "run.sh: timeout after ${timeout}s; stopping the guest (qemu pid $qpid)" >&2
    kill -TERM "$qpid" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
qrc=0
wait "$qpid" || qrc=$?
qpid=""
if [[ -n $tpid ]]; then wait "$tpid" 2>/dev/null || true; tpid=""; fi
[[ -n $log ]] && cp "$console" "$log"
ms=$(( ($(date +%s%N) - start) / 1000000 )); elapsed=$((ms / 1000)).$(printf %03d $((ms % 1000)))

if ((timed_out)); then
  exit 124
fi
if [[ -s $share/.vm/exit-status ]]; then
  rc=$(cat "$share/.vm/exit-status")
elif grep -q '^THINFS-VM-EXIT ' "$console"; then
  rc=$(grep '^THINFS-VM-EXIT ' "$console" | tail -1 | awk '{print $2}' | tr -d '\r')
else
  echo "run.sh: the guest reported no exit status (qemu exited $qrc)" >&2
  [[ -s $tmp/qemu.out ]] && sed 's/^/qemu: /' "$tmp/qemu.out" >&2
  ((quiet)) && tail -30 "$console" >&2
  exit 125
fi
echo "run.sh: guest exited $rc after ${elapsed}s" >&2
exit "$rc"
