#!/bin/bash
# layer-bench.sh: the layer store against overlayfs, side by side in one run, on one image
# (issue 4, section 7). It reports; it does not fail on a slow figure.
#
#   1. image import: `thinfs image import` of an OCI layout vs `tar -xzf` of the same blobs into one
#      directory per layer, whiteouts converted to overlayfs's form
#   2. container create + mount: `layer create-rw` + `thinfs mount` (first mount: the daemon starts;
#      later mounts: through the running daemon) vs `mkdir upper work merged` + `mount -t overlay`
#   3. the same with N (1,000) more image layers in the pool
#   4. first 4 KiB write into the middle of a 1 GiB file from the image: block copy-on-write vs
#      overlayfs's whole-file copy-up
#   5. disk space of 10 containers of the image, each writing a few MiB
#
# Usage: layer-bench.sh [--quick] [--dir DIR] [--reps N] [--layers N] [--big-size SIZE] [--image debian|busybox]
# Env:   THINFS_BIN=DIR   thinfs and thinfs-mount (default: .build-layerbench/release of this checkout)
#        THINFS_SRC=DIR   the checkout, when running a copy of this script
set -uo pipefail

here=${THINFS_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}   # the checkout (for make-test-image.sh)
BIN=${THINFS_BIN:-$here/.build-layerbench/release}
base=/var/tmp
reps=7
nlayers=1000
big=1G
image=debian
quick=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1; reps=3; nlayers=100; big=128M; image=busybox ;;
        --dir) base=$2; shift ;;
        --reps) reps=$2; shift ;;
        --layers) nlayers=$2; shift ;;
        --big-size) big=$2; shift ;;
        --image) image=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "layer-bench: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "layer-bench: run as root (overlayfs, FUSE, device nodes)" >&2; exit 1; }
for b in thinfs thinfs-mount; do
    [ -x "$BIN/$b" ] || { echo "layer-bench: $BIN/$b missing: swift build -c release --scratch-path .build-layerbench (or set THINFS_BIN)" >&2; exit 1; }
done
THINFS=$BIN/thinfs
CACHE=/var/cache/thinfs-bench

W=$base/layerbench-$$
mkdir -p "$W"/{samples,mnt}
W=$(cd "$W" && pwd)
S=$W/samples
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- cleanup
# Every mount under $W (FUSE through `thinfs umount`, then overlay and anything else with umount),
# every thinfs-mount daemon serving a root under $W (by PID: TERM after 30 s), then $W.
daemons() {
    local p
    for p in /proc/[0-9]*; do
        [ -r "$p/cmdline" ] || continue
        # A process may exit between the test and the read: its error is not ours to print.
        { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q -- "thinfs-mount .*--root $W/" && echo "${p#/proc/}"
    done
}
mounts_under() { awk -v w="$W/" 'index($2, w) == 1 { print $2, $3 }' /proc/mounts | sort -r; }
cleanup() {
    local rc=$? mp fs pid i
    trap - EXIT INT TERM
    while read -r mp fs; do
        [ -n "$mp" ] || continue
        case $fs in
            fuse*) "$THINFS" umount "$mp" >/dev/null 2>&1 || umount "$mp" 2>/dev/null || umount -l "$mp" ;;
            *) umount "$mp" 2>/dev/null || umount -l "$mp" ;;
        esac
    done < <(mounts_under)
    for i in $(seq 300); do [ -z "$(daemons)" ] && break; sleep 0.1; done
    for pid in $(daemons); do log "cleanup: daemon $pid still running, TERM"; kill -TERM "$pid" 2>/dev/null; done
    for i in $(seq 100); do [ -z "$(daemons)" ] && break; sleep 0.1; done
    if [ -n "$(mounts_under)" ]; then log "cleanup: mounts left under $W, not removing it:"; mounts_under >&2
    else rm -rf "$W"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
now() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }   # microseconds
# sample NAME START: appends milliseconds since START to samples/NAME
sample() { local t; t=$(now); awk -v a="$2" -v b="$t" 'BEGIN { printf "%.3f\n", (b - a) / 1000 }' >> "$S/$1"; }
note() { printf '%s\n' "$2" >> "$S/$1"; }
die() { log "FAILED: $*"; exit 1; }
run() { "$@" >/dev/null 2>"$W/last.err" || { cat "$W/last.err" >&2; die "$*"; }; }
wait_no_daemon() {
    local i
    for i in $(seq 300); do [ -z "$(daemons)" ] && return 0; sleep 0.05; done
    die "thinfs-mount daemon did not exit after the last unmount: $(daemons)"
}
bytes_of() { numfmt --from=iec "$1"; }

uptime_before=$(uptime)
start_us=$(now)
# ---------------------------------------------------------------- the image
# Layers as plain tars; then an OCI layout with gzip blobs (as a registry serves them).
mkdir -p "$W/layers"
use_debian() {
    mkdir -p "$CACHE"
    if [ ! -s "$CACHE/bookworm-minbase.tar" ]; then
        command -v debootstrap >/dev/null || apt-get install -y debootstrap >/dev/null 2>&1 || return 1
        log "debootstrap --variant=minbase bookworm (cached in $CACHE)"
        rm -rf "$CACHE/rootfs.tmp"
        debootstrap --variant=minbase bookworm "$CACHE/rootfs.tmp" http://deb.debian.org/debian >"$W/debootstrap.log" 2>&1 || return 1
        tar --create --file "$CACHE/bookworm-minbase.tar.tmp" --directory "$CACHE/rootfs.tmp" --format=pax \
            --xattrs --xattrs-include='*' --numeric-owner --sort=name . || return 1
        mv "$CACHE/bookworm-minbase.tar.tmp" "$CACHE/bookworm-minbase.tar"
        rm -rf "$CACHE/rootfs.tmp"
    fi
    cp "$CACHE/bookworm-minbase.tar" "$W/layers/1.tar"
    # Layer 2: what an application layer looks like: added files, a deleted directory, an opaque one.
    local l2=$W/l2
    mkdir -p "$l2"/{etc,usr/share/doc,var/cache/apt,opt/app}
    printf 'bench\n' > "$l2/etc/bench-marker"
    head -c 2M /dev/urandom > "$l2/opt/app/blob"
    : > "$l2/usr/share/doc/.wh.debconf"
    : > "$l2/var/cache/apt/.wh..wh..opq"
    tar --create --file "$W/layers/2.tar" --directory "$l2" --format=pax --numeric-owner --sort=name .
    rm -rf "$l2"
    image_name="Debian bookworm minbase (debootstrap) + a small layer with whiteouts"
}
use_busybox() {
    "$here/scripts/make-test-image.sh" "$W/testimage" >/dev/null || die "make-test-image.sh"
    cp "$W/testimage/layer1.tar" "$W/layers/1.tar"; cp "$W/testimage/layer2.tar" "$W/layers/2.tar"
    rm -rf "$W/testimage"
    image_name="busybox test image (scripts/make-test-image.sh)"
}
if [ "$image" = debian ]; then use_debian || { log "debootstrap failed: falling back to the busybox image"; use_busybox; }
else use_busybox; fi

oci=$W/oci
mkdir -p "$oci/blobs/sha256"
sha() { sha256sum "$1" | cut -d' ' -f1; }
diffs=() blobs=() layer_json=()
for n in 1 2; do
    d=$(sha "$W/layers/$n.tar"); gzip -n -1 -c "$W/layers/$n.tar" > "$W/blob"
    b=$(sha "$W/blob"); s=$(stat -c %s "$W/blob"); mv "$W/blob" "$oci/blobs/sha256/$b"
    diffs+=("\"sha256:$d\""); blobs+=("$oci/blobs/sha256/$b")
    layer_json+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$b\",\"size\":$s}")
done
join() { local IFS=,; echo "$*"; }
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[%s]}}' "$(join "${diffs[@]}")" > "$W/config.json"
cfg=$(sha "$W/config.json"); cs=$(stat -c %s "$W/config.json"); mv "$W/config.json" "$oci/blobs/sha256/$cfg"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
    "$cfg" "$cs" "$(join "${layer_json[@]}")" > "$W/manifest.json"
man=$(sha "$W/manifest.json"); ms=$(stat -c %s "$W/manifest.json"); mv "$W/manifest.json" "$oci/blobs/sha256/$man"
printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s}]}' "$man" "$ms" > "$oci/index.json"
tar_bytes=$(( $(stat -c %s "$W/layers/1.tar") + $(stat -c %s "$W/layers/2.tar") ))
tar_entries=$(( $(tar -tf "$W/layers/1.tar" | wc -l) + $(tar -tf "$W/layers/2.tar" | wc -l) ))
gz_bytes=$(( $(stat -c %s "${blobs[0]}") + $(stat -c %s "${blobs[1]}") ))
rm -f "$W/layers/1.tar" "$W/layers/2.tar"
log "image: $image_name: 2 layers, $tar_bytes bytes in $tar_entries tar entries, $gz_bytes bytes gzip"

# The overlay side of an import: one directory per layer, whiteouts converted to overlayfs's form
# (.wh.NAME -> a 0/0 character device NAME, .wh..wh..opq -> trusted.overlay.opaque=y): compare.py's
# overlay-lower step, the code `thinfs compare` builds its overlayfs lower directories with.
COMPARE=$here/scripts/compare/compare.py
untar_layers() {   # untar_layers DESTDIR
    local n=0 blob
    for blob in "${blobs[@]}"; do
        n=$((n + 1))
        python3 "$COMPARE" workload overlay-lower "$blob" "$1/$n" >/dev/null || die "layer $n into $1/$n"
    done
}
lowerdir() { echo "$1/2:$1/1"; }

new_root() {   # new_root DIR: an empty layer store (defaults: 100G sparse data, 10G base device)
    run "$THINFS" init --root "$1" --storage-opt dm.use_deferred_deletion=true --storage-opt dm.use_deferred_removal=true
}
sync_quiet() { sync; }

# ---------------------------------------------------------------- 1. import
log "1. image import, $(( reps < 5 ? reps : 5 )) rounds (each into a new store / new directories; the side that goes first alternates)"
import_thinfs() {
    local r=$W/imp-root-$1 t
    new_root "$r"; sync_quiet
    t=$(now)
    top=$("$THINFS" image import --root "$r" "$oci" 2>"$W/last.err") || { cat "$W/last.err" >&2; die "image import"; }
    sample import.thinfs "$t"
    rm -rf "$r"
}
import_overlay() {
    local d=$W/imp-ovl-$1 t
    sync_quiet
    t=$(now); untar_layers "$d"; sync_quiet; sample import.overlay_sync "$t"
    rm -rf "$d"
}
import_overlay_nosync() {
    local d=$W/imp-ovl-$1 t
    sync_quiet
    t=$(now); untar_layers "$d"; sample import.overlay "$t"
    rm -rf "$d"
}
for i in $(seq $(( reps < 5 ? reps : 5 ))); do
    if [ $((i % 2)) = 1 ]; then import_thinfs "$i"; import_overlay_nosync "$i"; else import_overlay_nosync "$i"; import_thinfs "$i"; fi
done
for i in $(seq 3); do import_overlay "$i"; done

# The store and the overlay lower directories every later step uses.
R=$W/root
new_root "$R"
top=$("$THINFS" image import --root "$R" "$oci" 2>"$W/last.err" | tail -1) || die "image import"
[ -n "$top" ] || die "image import printed no layer id"
untar_layers "$W/lower"
LOWER=$(lowerdir "$W/lower")
log "image top layer: $top"

# ---------------------------------------------------------------- 2/3. create + mount
cnt=0
# thinfs_container TAG KIND: create-rw + mount of a new container on $top, timed in parts.
thinfs_container() {
    local id=c$cnt mp=$W/mnt/c$cnt t
    cnt=$((cnt + 1)); mkdir -p "$mp"
    t=$(now); run "$THINFS" layer create-rw --root "$R" "$id" --parent "$top"; sample "$1.create-rw" "$t"
    t=$(now); run "$THINFS" mount --root "$R" "$id" "$mp"; sample "$1.mount.$2" "$t"
    [ -x "$mp/bin/sh" ] || [ -e "$mp/bin" ] || die "container $id: $mp has no /bin"
    echo "$id $mp" >> "$W/containers"
}
thinfs_unmount_all() {
    local id mp
    [ -f "$W/containers" ] || return 0
    while read -r id mp; do
        # A mount that has gone before its umount means the daemon died (libfuse's auto_unmount
        # removes its mounts): recorded, and the run goes on.
        if ! awk -v m="$mp" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; then
            log "WARNING: container $id: $mp is no longer mounted before its umount (did thinfs-mount exit?)"
            note vanished "$id"
            continue
        fi
        run "$THINFS" umount --root "$R" "$mp"
    done < "$W/containers"
    wait_no_daemon
}
thinfs_remove_all() {   # layer rm of every container made so far (unmounted)
    local id mp
    [ -f "$W/containers" ] || return 0
    while read -r id mp; do run "$THINFS" layer rm --root "$R" "$id"; rmdir "$mp"; done < "$W/containers"
    rm -f "$W/containers"
}
thinfs_teardown() { thinfs_unmount_all; thinfs_remove_all; }
ocnt=0
overlay_container() {   # overlay_container TAG
    local d=$W/ovl/o$ocnt t
    ocnt=$((ocnt + 1))
    t=$(now)
    mkdir -p "$d/upper" "$d/work" "$d/merged" &&
        mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$d/upper,workdir=$d/work" "$d/merged" || die "mount overlay"
    sample "$1.overlay" "$t"
    echo "$d" >> "$W/ovl-containers"
}
overlay_teardown() {
    local d
    [ -f "$W/ovl-containers" ] || return 0
    while read -r d; do umount "$d/merged" || die "umount $d/merged"; rm -rf "$d"; done < "$W/ovl-containers"
    rm -f "$W/ovl-containers"
}
latency_round() {   # latency_round TAG: $reps first mounts (daemon start), each followed by 2 later mounts
    local i
    for i in $(seq "$reps"); do
        thinfs_container "$1" first
        thinfs_container "$1" later
        thinfs_container "$1" later
        thinfs_teardown
        overlay_container "$1"; overlay_container "$1"; overlay_container "$1"
        overlay_teardown
    done
}
log "2. create + mount latency, $reps x (1 first + 2 later) thinfs, $((reps * 3)) overlay"
latency_round lat

log "3. $nlayers image layers, siblings on the image's top layer, 4 clients at a time through the daemon"
# Siblings rather than a chain so that 4 clients can overlap: on this 2-CPU machine a CLI call
# spends most of its time being started. A container stays mounted, so every create goes to the
# daemon's control socket and none opens the pool itself.
thinfs_container keeper first
t=$(now)
seq "$nlayers" | xargs -P 4 -I{} "$THINFS" layer create --root "$R" "fill{}" --parent "$top" >/dev/null 2>"$W/fill.err" ||
    { cat "$W/fill.err" >&2; die "layer create of the $nlayers layers"; }
sample fill.create "$t"
thinfs_teardown
[ "$("$THINFS" layer ls --root "$R" --json | grep -o '"fill[0-9]*"' | sort -u | wc -l)" = "$nlayers" ] ||
    log "   WARNING: layer ls does not list $nlayers fill layers"
log "   created in $(tail -1 "$S/fill.create") ms"
latency_round lat1k
t=$(now); run "$THINFS" layer ls --root "$R" --json; sample fill.ls "$t"
t=$(now); run "$THINFS" info --root "$R"; sample fill.info "$t"

# ---------------------------------------------------------------- 4. copy-on-write vs copy-up
log "4. first write into a $big file from the image"
bigbytes=$(bytes_of "$big")
mkdir -p "$W/bigsrc/data"
head -c "$bigbytes" /dev/urandom > "$W/bigsrc/data/big.bin" || die "making the big file"
tar --create --file "$W/big.tar" --directory "$W/bigsrc" --format=pax --numeric-owner . || die "big tar"
rm -rf "$W/bigsrc"
run "$THINFS" layer create --root "$R" big --parent "$top"
sync_quiet
t=$(now); run "$THINFS" layer apply-diff --root "$R" big "$W/big.tar"; sample big.apply.thinfs "$t"
mkdir -p "$W/lower/big"; sync_quiet
t=$(now); tar --extract --file "$W/big.tar" --directory "$W/lower/big" --numeric-owner || die "untar big"; sample big.apply.overlay "$t"
rm -f "$W/big.tar"
bigtop=$top; top=big; LOWER="$W/lower/big:$(lowerdir "$W/lower")"
# write4k FSYNC FILE...: for each FILE, compare.py's cow-write step (what `thinfs compare` times as
# cow-first and cow-later): open O_RDWR, pwrite 4 KiB at the middle, optionally fsync, close; then
# one more such write 448 KiB further on. Prints the milliseconds of the first writes, then of the
# second writes.
write4k() {
    local sync=$1 f j firsts=() seconds=() a b; shift
    for f in "$@"; do
        j=$(python3 "$COMPARE" workload cow-write "$f" 1 "$sync") || return 1
        read -r a b < <(python3 -c 'import json, sys; r = json.load(sys.stdin); print("%.3f %.3f" % (r["first_ms"], r["later_ms"][0]))' <<< "$j")
        firsts+=("$a"); seconds+=("$b")
    done
    echo "${firsts[*]} ${seconds[*]}"
}
cow_round() {   # cow_round FSYNC
    local id mp d t a b c e
    thinfs_container cowsetup first
    overlay_container cowsetup
    sync_quiet
    read -r id mp < <(tail -1 "$W/containers")
    # Both sides read the file once first, so the lower data sits in the page cache for both.
    cat "$mp/data/big.bin" > /dev/null; d=$(tail -1 "$W/ovl-containers"); cat "$d/merged/data/big.bin" > /dev/null
    # The side that writes first alternates with the round.
    if [ $((cnt % 2)) = 0 ]; then
        read -r a b c e < <(write4k "$1" "$mp/data/big.bin" "$d/merged/data/big.bin") || die "write4k"
    else
        read -r b a e c < <(write4k "$1" "$d/merged/data/big.bin" "$mp/data/big.bin") || die "write4k"
    fi
    [ -n "$e" ] || die "write4k printed no times"
    note "cow.thinfs.fsync$1" "$a"; note "cow.overlay.fsync$1" "$b"
    note "cow2.thinfs.fsync$1" "$c"; note "cow2.overlay.fsync$1" "$e"
    note cow.upper.bytes "$(du -sB1 "$d/upper" | cut -f1)"
    sync_quiet
    "$THINFS" layer ls --root "$R" --json > "$W/ls.json" 2>/dev/null && python3 - "$W/ls.json" "$id" >> "$S/cow.excl.bytes" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows.get("layers", rows) if isinstance(rows, dict) else rows
for r in rows:
    if r.get("id") == sys.argv[2]:
        print(r.get("exclusiveBytes", r.get("exclusive", "")))
EOF
    thinfs_teardown; overlay_teardown
}
n=$(( reps < 5 ? reps : 5 ))
for i in $(seq "$n"); do cow_round 0; done
for i in $(seq "$n"); do cow_round 1; done
top=$bigtop; LOWER=$(lowerdir "$W/lower")

# ---------------------------------------------------------------- 5. disk space
log "5. disk space of 10 containers, each writing 4 MiB ($nlayers fill layers still in the pool)"
# The fill layers stay: they share every block with the image, so they change only the metadata.
run "$THINFS" layer rm --root "$R" big
rm -rf "$W/lower/big"
run "$THINFS" cleanup --root "$R"
sync_quiet
pool_used() {   # allocated bytes of the pool's data and metadata files, and Data Space Used
    local data meta
    data=$("$THINFS" info --root "$R" | awk -F': *' '/^ *Data file/ { print $2 }')
    meta=$("$THINFS" info --root "$R" | awk -F': *' '/^ *Metadata file/ { print $2 }')
    echo "$(du -B1 "$data" | cut -f1) $(du -B1 "$meta" | cut -f1) $("$THINFS" info --root "$R" | awk -F': *' '/Data Space Used/ { print $2 }' | tr -d ' ')"
}
read -r d0 m0 u0 < <(pool_used)
o0=$(du -sB1 "$W/lower" | cut -f1)
for i in $(seq 10); do thinfs_container space later; overlay_container space; done
while read -r id mp; do head -c 4M /dev/urandom > "$mp/root/written.bin" || die "write in $id"; done < "$W/containers"
while read -r d; do head -c 4M /dev/urandom > "$d/merged/root/written.bin" || die "write in $d"; done < "$W/ovl-containers"
sync_quiet
note space.mounted "$(awk -v w="$W/mnt/" 'index($2, w) == 1' /proc/mounts | wc -l)"
thinfs_unmount_all          # every daemon has closed and committed its container
sync_quiet
read -r d1 m1 u1 < <(pool_used)
"$THINFS" layer ls --root "$R" > "$W/space-ls.txt" 2>&1
o1=$(du -sB1 "$W/lower" "$W"/ovl/o*/upper "$W"/ovl/o*/work | awk '{ s += $1 } END { print s }')
ou=$(du -sB1 "$W"/ovl/o*/upper | awk '{ s += $1 } END { print s }')
for v in d0 m0 u0 d1 m1 u1 o0 o1 ou; do printf '%s\n' "${!v}" > "$S/space.$v"; done
thinfs_remove_all; overlay_teardown

# ---------------------------------------------------------------- report
log "done; report"
uptime_after=$(uptime)
run_seconds=$(( ($(now) - start_us) / 1000000 ))
python3 - "$S" "$image_name" "$tar_bytes" "$tar_entries" "$gz_bytes" "$nlayers" "$big" "$reps" "$uptime_before" "$uptime_after" "$W/space-ls.txt" "$run_seconds" <<'EOF'
import os, statistics, sys
S, image, tar_bytes, entries, gz, nlayers, big, reps, up0, up1, lsfile, secs = sys.argv[1:]
def load(name):
    p = os.path.join(S, name)
    return [float(x) for x in open(p).read().split()] if os.path.exists(p) else []
def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
def cell(name):
    v = load(name)
    if not v: return "", None
    m = statistics.median(v)
    if len(v) == 1: return f"{fmt(m)}", m
    return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))}, n={len(v)})", m
def both(a, b):   # median of the per-index sum of two sample files
    x, y = load(a), load(b)
    v = [p + q for p, q in zip(x, y)]
    if not v: return "", None
    m = statistics.median(v)
    return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))}, n={len(v)})", m
rows = []
def row(label, t, o, note=""):
    (ts, tm), (os_, om) = t, o
    ratio = f"{tm / om:.2f}x" if tm is not None and om else ""
    rows.append((label, ts, os_, ratio, note))

print(f"\nlayer-bench: {image}: 2 layers, {int(tar_bytes):,} bytes of tar ({int(entries):,} entries), {int(gz):,} bytes gzip")
print(f"load: before: {up0.strip()}\n      after:  {up1.strip()}\nrun time: {secs} s")
print("times in ms: median (min–max, n); ratio = thinfs / overlay, above 1 means thinfs is slower\n")
def lat(tag, label):
    cr = load(f"{tag}.create-rw")
    first, later = load(f"{tag}.mount.first"), load(f"{tag}.mount.later")
    # create-rw samples interleave: first, later, later per round
    crf = cr[0::3]; crl = [x for i, x in enumerate(cr) if i % 3]
    def stat(v):
        if not v: return "", None
        m = statistics.median(v); return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))}, n={len(v)})", m
    ov = cell(f"{tag}.overlay")
    row(f"{label} create-rw, daemon not running", stat(crf), ("", None))
    row(f"{label} mount, first (starts the daemon)", stat(first), ("", None))
    row(f"{label} create-rw + mount, first", stat([a + b for a, b in zip(crf, first)]), ov, "overlay: mkdir upper work merged + mount")
    row(f"{label} create-rw, daemon running", stat(crl), ("", None))
    row(f"{label} mount, daemon running", stat(later), ("", None))
    row(f"{label} create-rw + mount, daemon running", stat([a + b for a, b in zip(crl, later)]), ov)
row("1. import the image (OCI layout, gzip)", cell("import.thinfs"), cell("import.overlay"), "overlay: tar -xzf per layer + whiteouts")
row("1. import, overlay side then sync", cell("import.thinfs"), cell("import.overlay_sync"), "import commits the pool")
lat("lat", "2.")
row(f"3. create {int(nlayers):,} sibling image layers, 4 clients (total)", cell("fill.create"), ("", None))
lat("lat1k", f"3. +{int(nlayers):,} layers:")
row(f"3. layer ls --json / info with {int(nlayers):,} more layers", cell("fill.ls"), ("", None), f"info: {cell('fill.info')[0]}")
row(f"4. apply-diff of a {big} file vs tar -x", cell("big.apply.thinfs"), cell("big.apply.overlay"))
row(f"4. first 4K write in a {big} image file", cell("cow.thinfs.fsync0"), cell("cow.overlay.fsync0"), "open O_RDWR + pwrite + close")
row(f"4. first 4K write + fsync", cell("cow.thinfs.fsync1"), cell("cow.overlay.fsync1"))
row(f"4. second 4K write, same file", cell("cow2.thinfs.fsync0"), cell("cow2.overlay.fsync0"))
row(f"4. second 4K write + fsync", cell("cow2.thinfs.fsync1"), cell("cow2.overlay.fsync1"))

w = [max(len(r[i]) for r in rows + [("workload", "thinfs", "overlay", "ratio", "note")]) for i in range(5)]
print("| workload | thinfs (ms) | overlay (ms) | ratio | note |")
print("|---|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")

def mib(b): return f"{int(b) / 1048576:,.1f} MiB"
up = load("cow.upper.bytes"); ex = load("cow.excl.bytes")
if up: print(f"\n4. after the first write: overlay upper dir {mib(statistics.median(up))}; thinfs container exclusive {mib(statistics.median(ex)) if ex else '?'} (layer ls)")
def raw(v):
    p = os.path.join(S, "space." + v)
    return open(p).read().strip() if os.path.exists(p) else "0"
d0, m0, u0, d1, m1, u1, o0, o1, ou = (raw(v) for v in "d0 m0 u0 d1 m1 u1 o0 o1 ou".split())
print(f"\n5. disk space, 10 containers of the image, each writing 4 MiB")
print("| | image only | + 10 containers | added | added per container |")
print("|---|---:|---:|---:|---:|")
import re
def human(v):   # thinfs info prints decimal units: 65.54 kB is 65,536 bytes
    m = re.match(r"([0-9.]+)\s*([kMGT]?B)", v)
    return float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)] if m else 0
hu0, hu1 = human(u0), human(u1)
print(f"| thinfs info: Data Space Used | {mib(hu0)} | {mib(hu1)} | {mib(hu1 - hu0)} | {mib((hu1 - hu0) / 10)} |")
print(f"| thinfs pool data file (du; freed pool blocks are reused, not punched) | {mib(d0)} | {mib(d1)} | {mib(int(d1) - int(d0))} | {mib((int(d1) - int(d0)) / 10)} |")
print(f"| thinfs pool metadata file (du) | {mib(m0)} | {mib(m1)} | {mib(int(m1) - int(m0))} | {mib((int(m1) - int(m0)) / 10)} |")
print(f"| overlay lower + upper + work dirs | {mib(o0)} | {mib(o1)} | {mib(int(o1) - int(o0))} | {mib((int(o1) - int(o0)) / 10)} |")
print(f"| … of which upper dirs | | {mib(ou)} | | |")
if os.path.exists(os.path.join(S, "vanished")):
    print("\nWARNING: containers whose mount was gone before their umount: " + " ".join(open(os.path.join(S, "vanished")).read().split()))
print("\nthinfs layer ls after the writes (fill layers left out):")
print("".join(l for l in open(lsfile) if not l.startswith("fill")))
EOF
