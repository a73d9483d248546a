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
# Acceleration: THINFS_VM_ACCEL=auto (the default) uses KVM (-accel kvm -cpu host) only if a probe
# shows that it works, else TCG (-accel tcg,thread=multi -cpu max). /dev/kvm alone proves nothing:
# this host's is PVM (the host is itself a PVM guest), where qemu aborts on `-cpu host` ("failed to
# set MSR 0x10a") and a stock kernel hangs with other CPU models. The probe boots the cached kernel
# under KVM with a 2 MB busybox initramfs whose /init prints a marker and powers off, and waits at
# most THINFS_VM_PROBE_TIMEOUT seconds (default 10; a working KVM needs about 1 s, TCG about 6 s).
# Its verdict is cached per host boot, kernel and qemu in ${THINFS_VM_CACHE:-/var/cache/thinfs-vm}/
# <version>/accel-probe (delete it to probe again). Cost here: about 0.2 s when qemu aborts, at most
# the timeout when the guest hangs, once per host boot. THINFS_VM_ACCEL=tcg or kvm skips the probe.
# THINFS_VM_KVM_CPU changes the KVM CPU model (default host; `host,-arch-capabilities` gets past
# that abort here, and then the guest hangs).
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
case ${THINFS_VM_ACCEL:-auto} in
  tcg|kvm|auto) ;;
  *) echo "run.sh: THINFS_VM_ACCEL must be tcg, kvm or auto, not '$THINFS_VM_ACCEL'" >&2; exit 2 ;;
esac
[[ -f $script ]] || { echo "run.sh: no script $script" >&2; exit 2; }
qemu=$(command -v qemu-system-x86_64) || { echo "run.sh: qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)" >&2; exit 125; }

entry=$("$here/fetch-kernel.sh")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/thinfs-vm.XXXXXX")
qpid="" tpid=""
# Stops the qemu we started (by its PID only) and reaps it.
stop_qemu() {
  if [[ -n $qpid ]]; then
    if kill -0 "$qpid" 2>/dev/null; then
      kill -TERM "$qpid" 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=""
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_qemu
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

tcg_accel=(-accel tcg,thread=multi -cpu max)
kvm_accel=(-accel kvm -cpu "${THINFS_VM_KVM_CPU:-host}")

# probe_kvm: sets probe_verdict to "kvm" if a KVM guest of the cached kernel reaches userspace
# within the timeout, else "tcg"; the verdict (and why, and what it cost) is cached per host boot.
# It runs in this shell, not in a $(...) subshell, so that the EXIT/INT/TERM traps see its qemu.
probe_verdict=""
probe_kvm() {
  local cachefile="$entry/accel-probe"
  local boot key; boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
  key="boot=$boot kernel=$(cat "$entry/version") qemu=$("$qemu" --version | head -1 | awk '{print $4}') cpu=${kvm_accel[3]}"
  if [[ -f $cachefile ]] && [[ $(head -1 "$cachefile") == "$key" ]]; then
    probe_verdict=$(sed -n 2p "$cachefile" | awk '{print $1}')
    echo "run.sh: KVM probe (cached for this host boot): $(sed -n 2p "$cachefile")" >&2
    return 0
  fi
  local verdict=tcg reason ms
  local t0; t0=$(date +%s%N)
  if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    reason="no usable /dev/kvm"
  else
    local pdir="$tmp/accel-probe"
    mkdir -p "$pdir/stage/bin"
    cp /bin/busybox "$pdir/stage/bin/busybox"
    printf '#!/bin/busybox sh\n/bin/busybox echo THINFS-ACCEL-PROBE-OK\n/bin/busybox poweroff -f\n' > "$pdir/stage/init"
    chmod 755 "$pdir/stage/init"
    (cd "$pdir/stage" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) > "$pdir/probe.cpio"
    : > "$pdir/console"
    "${pdeath[@]}" "$qemu" -nodefaults -no-user-config -machine pc "${kvm_accel[@]}" -smp "$cpus" -m 256 \
      -display none -serial "file:$pdir/console" -no-reboot \
      -kernel "$entry/vmlinux" -initrd "$pdir/probe.cpio" \
      -append "console=ttyS0 mitigations=off panic=-1 loglevel=4 rdinit=/init quiet" \
      < /dev/null > "$pdir/qemu.out" 2>&1 &
    qpid=$!
    local deadline=$(( $(date +%s%N) + ${THINFS_VM_PROBE_TIMEOUT:-10} * 1000000000 ))
    reason="no marker within ${THINFS_VM_PROBE_TIMEOUT:-10} s (the guest hangs)"
    while (( $(date +%s%N) < deadline )); do
      if grep -q THINFS-ACCEL-PROBE-OK "$pdir/console"; then verdict=kvm reason="the guest booted"; break; fi
      if ! kill -0 "$qpid" 2>/dev/null; then
        grep -q THINFS-ACCEL-PROBE-OK "$pdir/console" && { verdict=kvm reason="the guest booted"; break; }
        reason="qemu exited: $(grep -v '^$' "$pdir/qemu.out" | head -1)"
        break
      fi
      sleep 0.05
    done
    stop_qemu
    rm -rf "$pdir"
  fi
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\n%s %s ms: %s\n' "$key" "$verdict" "$ms" "$reason" > "$cachefile.tmp.$$" && mv "$cachefile.tmp.$$" "$cachefile"
  echo "run.sh: KVM probe: $verdict after $ms ms ($reason); cached in $cachefile" >&2
  probe_verdict=$verdict
}

pdeath=(); setpriv --help 2>/dev/null | grep -q -- --pdeathsig && pdeath=(setpriv --pdeathsig KILL --)
case ${THINFS_VM_ACCEL:-auto} in
  tcg) accel=("${tcg_accel[@]}") ;;
  kvm) accel=("${kvm_accel[@]}") ;;
  *) probe_kvm; if [[ $probe_verdict == kvm ]]; then accel=("${kvm_accel[@]}"); else accel=("${tcg_accel[@]}"); fi ;;
esac
echo "run.sh: accelerator: ${accel[*]}" >&2

console="$tmp/console.log"
: > "$console"
start=$(date +%s%N)
# setpriv --pdeathsig (set above): should this script itself be SIGKILLed (no trap runs), the
# kernel kills qemu too.
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
