#!/usr/bin/env bash
# Runs every kernel test in scripts/vm/tests/ in ONE guest boot and prints PASS/FAIL per test.
#
#   suite.sh [--bin DIR] [--keep DIR] [--timeout SECS] [TEST...]
#     --bin DIR      where thinfs and thinfs-mount are (default: `swift build`'s debug bin path,
#                    building them if needed)
#     --keep DIR     keep the work directory (pool files, manifests, console log) in DIR
#     --timeout SECS the guest's time limit (default 1800: the suite takes about 450 s on a quiet
#                    2-core host under TCG, and more than twice that under load)
#     TEST...        run only these tests (directory names under tests/)
#
# A test is a directory tests/NAME/ with up to three scripts, run in this order:
#   host-prepare  (optional, bash, on the host)  makes inputs in $VM_WORK; may attach pool files as
#                 virtio disks by writing lines "NAME=FILE" to $VM_WORK/drives
#   guest.sh      (bash, in the guest)            runs in /share/NAME (= $VM_WORK), exit 0 = pass
#   host-verify   (optional, bash, on the host)   checks what the guest left in $VM_WORK
# Host scripts get VM_WORK, THINFS (the thinfs binary), THINFS_MOUNT, and VM_TESTS (tests/).
# A test passes if all three exit 0. The suite exits 1 if any test fails, 125 if the guest did not
# finish, and 0 with a loud "SKIPPED" banner only when qemu is not installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin="" keep="" timeout=1800
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -*) echo "suite.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done

if ! command -v qemu-system-x86_64 >/dev/null; then
  cat <<'BANNER'
########################################################################
#  SKIPPED: kernel VM suite (scripts/vm/suite.sh)                      #
#  qemu-system-x86_64 is not installed, so nothing ran against a real  #
#  kernel. Install qemu-system-x86 (scripts/setup.sh does) to run it.  #
########################################################################
BANNER
  exit 0
fi

if (($#)); then tests=("$@"); else
  tests=()
  for d in "$here"/tests/*/; do [[ -f $d/guest.sh ]] && tests+=("$(basename "$d")"); done
fi
((${#tests[@]})) || { echo "suite.sh: no tests" >&2; exit 2; }

if [[ -z $bin ]]; then
  (cd "$repo" && swift build --product thinfs >&2 && swift build --product thinfs-mount >&2)
  bin=$(cd "$repo" && swift build --show-bin-path)
fi
bin=$(cd "$bin" && pwd)
export THINFS="$bin/thinfs" THINFS_MOUNT="$bin/thinfs-mount" VM_TESTS="$here/tests"

if [[ -n $keep ]]; then
  # Only ever wipe a directory an earlier --keep made.
  if [[ -d $keep && -n $(ls -A "$keep") && ! -f $keep/.thinfs-vm-suite ]]; then
    echo "suite.sh: --keep $keep exists and is not an earlier suite's work directory; choose another" >&2; exit 2
  fi
  rm -rf "$keep"; mkdir -p "$keep"; work=$(cd "$keep" && pwd); touch "$work/.thinfs-vm-suite"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/thinfs-vm-suite.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

declare -A result=()
start=$(date +%s)
drives=() guest_tests=()
for t in "${tests[@]}"; do
  [[ -f $here/tests/$t/guest.sh ]] || { echo "suite.sh: no test $t (tests/$t/guest.sh)" >&2; exit 2; }
  mkdir -p "$work/$t"
  cp "$here/tests/$t/guest.sh" "$work/$t/guest.sh"
  if [[ -f $here/tests/$t/host-prepare ]]; then
    echo "=== $t: host-prepare"
    t0=$(date +%s)
    if ! VM_WORK="$work/$t" bash "$here/tests/$t/host-prepare" > "$work/$t/host-prepare.log" 2>&1; then
      result[$t]="FAIL (host-prepare; see below)"
      sed 's/^/    /' "$work/$t/host-prepare.log" | tail -40
      continue
    fi
  fi
  if [[ -f $work/$t/drives ]]; then
    while read -r d; do [[ -n $d ]] && drives+=(--drive "$d"); done < "$work/$t/drives"
  fi
  [[ -f $here/tests/$t/host-prepare ]] && echo "    ($(($(date +%s) - t0)) s)"
  guest_tests+=("$t")
done

guest_rc=0
if ((${#guest_tests[@]})); then
  echo "=== booting the guest for: ${guest_tests[*]}"
  t0=$(date +%s)
  "$here/run.sh" --bin "$bin" --share "$work" --timeout "$timeout" --log "$work/console.log" \
    "${drives[@]}" "$here/guest-runner.sh" "${guest_tests[@]}" || guest_rc=$?
  echo "    (guest: $(($(date +%s) - t0)) s, initramfs build and boot included)"
fi

for t in "${guest_tests[@]}"; do
  status=$(cat "$work/$t/.guest-status" 2>/dev/null || echo "")
  if [[ $status != 0 ]]; then
    result[$t]="FAIL (guest: ${status:-did not run, guest exit $guest_rc})"
    continue
  fi
  if [[ -f $here/tests/$t/host-verify ]]; then
    echo "=== $t: host-verify"
    t0=$(date +%s)
    if ! VM_WORK="$work/$t" bash "$here/tests/$t/host-verify" 2>&1 | tee "$work/$t/host-verify.log"; then
      result[$t]="FAIL (host-verify)"
      continue
    fi
    echo "    ($(($(date +%s) - t0)) s)"
  fi
  result[$t]=PASS
done

echo "=== kernel VM suite ($(($(date +%s) - start)) s)"
failed=0
for t in "${tests[@]}"; do
  r=${result[$t]:-FAIL (not run)}
  [[ $r == PASS ]] || failed=1
  printf '%-28s %s\n' "$t" "$r"
done
# The console scrolls a failed test's lines far up, and CI keeps only the end of the output: repeat
# the end of each failed test's log last.
for t in "${tests[@]}"; do
  [[ ${result[$t]:-} == PASS ]] && continue
  for log in "$work/$t/guest.log" "$work/$t/host-verify.log"; do
    [[ -s $log ]] || continue
    echo "=== $t failed: the last 50 lines of $(basename "$log")"
    tail -n 50 "$log" | sed 's/^/    /'
  done
done
((guest_rc == 124 || guest_rc == 125)) && { echo "suite.sh: the guest did not finish (exit $guest_rc)"; exit 125; }
exit $failed
