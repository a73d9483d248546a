# Shared by fs-bench.sh, create-bench.sh and write-bench.sh (sourced, not run): undoing what a
# benchmark started, dropping caches before a timed step, and waiting for a daemon to exit.
#
# The sourcing script sets BENCH_NAME (for messages) and fills MOUNTS (mount points it may have
# mounted), PIDS (FUSE daemons it started), IMAGES (images that may sit behind a loop device) and
# SCRATCH (directories to remove at the end).
MOUNTS=(); PIDS=(); IMAGES=(); SCRATCH=()

bench_cleanup() {
    set +e
    local m p i
    for m in "${MOUNTS[@]}"; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m" 2>/dev/null || umount -l "$m"; fi
    done
    for p in "${PIDS[@]}"; do
        for i in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -TERM "$p"
    done
    for i in "${IMAGES[@]}"; do
        for m in $(losetup -j "$i" -O NAME -n 2>/dev/null); do losetup -d "$m"; done
    done
    rm -rf "${SCRATCH[@]}"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
wait_gone() {
    local i
    for i in $(seq 1 600); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "$BENCH_NAME: pid $1 still running after 60 s" >&2
    return 1
}
