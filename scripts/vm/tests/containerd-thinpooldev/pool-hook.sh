#!/bin/bash
# The conformance harness's THINFS_POOL_HOOK in the guest (Tests/ContainerdConformance): each
# subtest's `thinfs serve` gets an LVM thin pool of its own, since a kernel pool is adopted by one
# store only and the subtests run in parallel. guest.sh makes the pools (ctr/c1..cN) beforehand.
#   pool-hook.sh prepare ROOT   claims the next free pool for the subtest whose serve root is
#                               ROOT and prints `dm.thinpooldev=/dev/mapper/ctr-cI`
#   pool-hook.sh release ROOT   after that serve exited: no thin device of the pool is left active,
#                               and the pool holds exactly the store's devices (each layer's, as
#                               `thinfs layer ls` lists them, deferred-deleted ones included) and
#                               the base device, as thin_dump reads them from a metadata snapshot
#                               of the live pool. Saves the pool's metadata table for guest.sh's
#                               thin_check once the VG is deactivated.
# Claims are directories under $CTP_STATE (mkdir is atomic: two subtests never get one pool).
set -euo pipefail
. /share/.vm/lib.sh
. "$(dirname "$0")/layers-common.sh"
state=${CTP_STATE:?CTP_STATE names the claims directory}
op=$1 root=$2

case $op in
prepare)
  for p in $(cat "$state/pools"); do
    if mkdir "$state/claim-$p" 2>/dev/null; then
      echo "$root" > "$state/claim-$p/root"
      echo "dm.thinpooldev=/dev/mapper/ctr-$p"
      exit 0
    fi
  done
  vm_fail "no free pool left for $root (pools: $(cat "$state/pools"); one is needed per subtest)"
  ;;
release)
  pool=""
  for c in "$state"/claim-*; do
    [ "$(cat "$c/root" 2>/dev/null)" = "$root" ] && { pool=${c##*/claim-}; break; }
  done
  [ -n "$pool" ] || vm_fail "no pool was claimed for $root"
  [ ! -e "$state/claim-$pool/released" ] || vm_fail "pool $pool released twice"
  touch "$state/claim-$pool/released"
  dm=ctr-$pool
  # By name (serve names its thin devices POOL-ID), from one listing: `dmsetup ls --target thin`
  # asks each device for its table in turn and fails when another subtest's serve removes one
  # in between.
  left=$(dmsetup ls | awk -v p="$dm-" 'index($1, p) == 1 {print $1}' | tr '\n' ' ')
  [ -z "$left" ] || vm_fail "pool $dm ($root): thin devices left active after serve exited: $left"
  target=$(pool_target "$dm")
  dmsetup table "$(meta_node "$dm" | sed 's|^/dev/mapper/||')" > "$state/claim-$pool/tmeta.table"
  devs=$(pool_devs "$dm")
  if [ -e "$root/store/layers.db" ]; then
    mine=$(layer_field "$root/store" '*' deviceID | sort -n | tr '\n' ' ')
    extra=""
    for d in $devs; do has_word "$mine" "$d" || extra="$extra $d"; done
    for d in $mine; do has_word "$devs" "$d" || vm_fail "pool $dm ($root): the store's device $d is not in the pool [$devs]"; done
    [ "$(echo $extra | wc -w)" = 1 ] \
      || vm_fail "pool $dm ($root): devices [$devs], the store's layers [$mine]: expected one more (the base device), found [$extra]"
  else
    # serve stopped before it made its store: it must not have touched the pool.
    [ -z "$devs" ] || vm_fail "pool $dm ($root): no store was made, but the pool holds devices [$devs]"
  fi
  echo "$pool $dm $(dmsetup status "$target" | awk '{print "tx=" $4, "meta=" $5, "data=" $6}') devices=[$devs]" >> "$state/released"
  ;;
*) vm_fail "pool-hook.sh: unknown operation $op" ;;
esac
