#!/usr/bin/env bash
# ci-compare.sh: CI's check of `thinfs compare` (issue 15), run by scripts/test.sh.
#
#   scripts/compare/ci-compare.sh [THINFS]      (default .build/debug/thinfs)
#
# 1. `thinfs compare --quick` on the test image (scripts/make-test-image.sh), then checks that:
#    report.md and report.html name every setup that ran and every workload; each PNG is a PNG
#    (signature, IHDR chunk and its CRC) of the size compare.py --list gives, and `file` agrees;
#    results.json parses and has a figure for every setup that ran x every workload; the report
#    gives a reason for every setup it skipped; nothing is left mounted, running or in the scratch
#    directory.
#    When containerd, ctr, runc and containerd-shim-runc-v2 are installed, the containerd setups
#    (containerd-overlayfs, containerd-thinfs) must have run too, with every workload.
# 2. SIGTERM in the middle of a run: exit 143, and no mount, daemon, scratch file or report left;
#    with containerd installed, also SIGTERM while containerd-thinfs has a container running: no
#    containerd, shim, thinfs serve, mount or cgroup of the run left.
# Skips (exit 0, saying why) without root, /dev/fuse or Debian's python3-matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."
THINFS=$(realpath "${1:-.build/debug/thinfs}")
PY=/usr/bin/python3
say() { echo "ci-compare: $*"; }
fail() { echo "ci-compare: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || { say "SKIPPED: needs root"; exit 0; }
[ -e /dev/fuse ] || { say "SKIPPED: /dev/fuse is missing"; exit 0; }
$PY -c 'import matplotlib' 2>/dev/null || { say "SKIPPED: $PY has no matplotlib (apt-get install python3-matplotlib)"; exit 0; }
[ -x "$THINFS" ] || fail "$THINFS is not built"

work=$(mktemp -d /var/tmp/ci-compare.XXXXXX)
cleanup() {
    # Only if a check failed half-way: compare itself must leave nothing (checked below).
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
scripts/make-test-image.sh "$work/img" >/dev/null
mkdir "$work/scratch"
containerd_tools=1
for t in containerd ctr runc containerd-shim-runc-v2; do command -v $t >/dev/null || { containerd_tools=""; say "no $t: the containerd setups are not required"; }; done

left_behind() {   # what a run left: mounts and processes naming the scratch directory, files in it
    awk -v w="$work/scratch/" 'index($2, w) == 1 { print "mounted: " $2 }' /proc/mounts
    local p
    for p in /proc/[0-9]*; do
        { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q -- "$work/scratch/" && echo "running: ${p#/proc/} $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)"
    done
    find "$work/scratch" -mindepth 1 -maxdepth 1 -printf 'scratch: %p\n'
    find /dev/shm -maxdepth 1 -name 'thinfs-compare.*' -newer "$work/img" -printf 'shm: %p\n'
}

# ── 1. a quick run ──
say "thinfs compare --quick on the test image"
t0=$(date +%s)
timeout 480 "$THINFS" compare --image "$work/img/oci" --quick --output "$work/out" --dir "$work/scratch" \
    || fail "thinfs compare --quick exited $? (its messages are above)"
secs=$(( $(date +%s) - t0 ))
say "the run took $secs s (budget 180 s on an idle CI machine; load now: $(cut -d' ' -f1-3 /proc/loadavg))"
left=$(left_behind)
[ -z "$left" ] || fail "compare left behind: $left"

$PY - "$work/out" "$($PY scripts/compare/compare.py --list)" "$containerd_tools" <<'EOF' || fail "the report check (above)"
import json, os, struct, subprocess, sys, zlib
out, catalog, containerd = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
errors = []
res = json.load(open(os.path.join(out, "results.json")))
md = open(os.path.join(out, "report.md")).read()
page = open(os.path.join(out, "report.html")).read()
ran = [s for s, v in res["setups"].items() if v["status"] == "ran"]
for s in ("thinfs", "overlayfs", "fuse-overlayfs") + (("containerd-overlayfs", "containerd-thinfs") if containerd else ()):
    if s not in ran:
        errors.append(f"setup {s} did not run: {res['setups'].get(s)}")
for s, v in res["setups"].items():
    if v["status"] == "skipped" and not v.get("reason"):
        errors.append(f"setup {s} skipped without a reason")
    for name, text in (("report.md", md), ("report.html", page)):
        if s not in text:
            errors.append(f"{name} does not name setup {s}")
if res["workloads"] != catalog["workloads"]:
    errors.append(f"workloads {res['workloads']} are not every workload {catalog['workloads']}")
for w in catalog["workloads"]:
    for name, text in (("report.md", md), ("report.html", page)):
        if f"{w}:" not in text:
            errors.append(f"{name} has no section for workload {w}")
    for s in ran:
        v = [r["value"] for r in res["runs"] if r["workload"] == w and r["setup"] == s]
        if not v or not all(isinstance(x, (int, float)) for x in v):
            errors.append(f"results.json has no figure for {s} x {w}")
        if s != "overlayfs" and "ratio" not in res["summary"].get(w, {}).get(s, {}):
            errors.append(f"results.json has no ratio to its reference for {s} x {w}")
if "containerd-thinfs" in ran and res["summary"]["start"]["containerd-thinfs"].get("reference") != "containerd-overlayfs":
    errors.append("containerd-thinfs is not compared with containerd-overlayfs: " + str(res["summary"]["start"]["containerd-thinfs"]))
if "data:image/png;base64," not in page or "src=\"http" in page:
    errors.append("report.html is not self-contained (the plots are not embedded)")
for name, (w, h) in catalog["plots"].items():
    p = os.path.join(out, name)
    if not os.path.exists(p):
        errors.append(f"{name} is missing")
        continue
    data = open(p, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        errors.append(f"{name}: not a PNG (signature {data[:16]!r})")
        continue
    length, = struct.unpack(">I", data[8:12])
    pw, ph = struct.unpack(">II", data[16:24])
    crc, = struct.unpack(">I", data[16 + length:20 + length])
    if zlib.crc32(data[12:16 + length]) != crc:
        errors.append(f"{name}: the IHDR chunk's CRC is wrong")
    if (pw, ph) != (w, h):
        errors.append(f"{name}: {pw}x{ph}, expected {w}x{h}")
    if not data.endswith(b"IEND\xaeB`\x82"):
        errors.append(f"{name}: no IEND chunk at the end")
    f = subprocess.run(["file", "-b", p], capture_output=True, text=True).stdout
    if f and f"PNG image data, {w} x {h}" not in f:
        errors.append(f"{name}: file(1) says {f.strip()!r}")
    if f"{name}" not in md:
        errors.append(f"report.md does not show {name}")
for e in errors:
    print("  " + e)
print(f"ci-compare: report check: {len(ran)} setups x {len(catalog['workloads'])} workloads, {len(catalog['plots'])} plots, "
      f"{len(errors)} problems")
sys.exit(1 if errors else 0)
EOF

# ── 2. SIGTERM half-way ──
say "SIGTERM during a run"
"$THINFS" compare --image "$work/img/oci" --quick --setups thinfs,overlayfs --output "$work/out-term" --dir "$work/scratch" \
    > "$work/term.log" 2>&1 &
pid=$!
# Wait until a container is mounted: the signal then lands with mounts and a daemon to clean up.
for _ in $(seq 600); do
    grep -q " $work/scratch/.*/mnt/" /proc/mounts && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
grep -q " $work/scratch/" /proc/mounts || fail "no mount appeared under $work/scratch within 60 s: $(cat "$work/term.log")"
kill -TERM $pid
rc=0; wait $pid || rc=$?
[ $rc = 143 ] || fail "after SIGTERM compare exited $rc, expected 143: $(tail -5 "$work/term.log")"
left=$(left_behind)
[ -z "$left" ] || fail "after SIGTERM compare left behind: $left"
[ ! -e "$work/out-term" ] || fail "after SIGTERM a partial report is left in $work/out-term: $(ls "$work/out-term")"

if [ -n "$containerd_tools" ]; then
    say "SIGTERM while containerd-thinfs runs a container"
    cgroups_before=$(ls -d /sys/fs/cgroup/thinfs-compare-* /sys/fs/cgroup/*/thinfs-compare-* 2>/dev/null || true)
    "$THINFS" compare --image "$work/img/oci" --quick --setups containerd-thinfs --workloads seq-write \
        --output "$work/out-term2" --dir "$work/scratch" > "$work/term2.log" 2>&1 &
    pid=$!
    # A container's rootfs, mounted by the shim under the private containerd's state directory.
    for _ in $(seq 1200); do
        grep -q " $work/scratch/.*/io.containerd.runtime.v2.task/.*/rootfs " /proc/mounts && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    grep -q " $work/scratch/.*/rootfs " /proc/mounts || fail "no container rootfs appeared within 120 s: $(tail -5 "$work/term2.log")"
    kill -TERM $pid
    rc=0; wait $pid || rc=$?
    [ $rc = 143 ] || fail "after SIGTERM (containerd) compare exited $rc, expected 143: $(tail -5 "$work/term2.log")"
    left=$(left_behind)
    [ -z "$left" ] || fail "after SIGTERM compare left behind (containerd): $left"
    cgroups_after=$(ls -d /sys/fs/cgroup/thinfs-compare-* /sys/fs/cgroup/*/thinfs-compare-* 2>/dev/null || true)
    [ "$cgroups_after" = "$cgroups_before" ] || fail "after SIGTERM (containerd) cgroups left: $cgroups_after"
    [ ! -e "$work/out-term2" ] || fail "after SIGTERM (containerd) a partial report is left in $work/out-term2"
fi
say "passed"
