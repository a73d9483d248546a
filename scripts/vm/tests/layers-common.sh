# Guest helpers for the layer-store tests on kernel pools (layers-thinpooldev, layers-loop).
# Sourced after /share/.vm/lib.sh and common.sh. Every helper reads the kernel or the store
# directly; none assumes a result.

# step TEXT: a heading with the guest's uptime, so the log shows where the time goes.
step() { echo "--- $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }

# layer_field ROOT ID FIELD: FIELD of layer ID in `thinfs layer ls --json` (empty if the layer is
# not listed; ID '*' prints FIELD of every layer). The JSON is pretty-printed, one key per line; rows are the objects at depth 2.
# (No python or jq in the guest: busybox awk, counting braces.)
layer_field() {
  local json
  json=$(thinfs layer ls --root "$1" --json) || vm_fail "thinfs layer ls --json failed"
  json_field "$json" "$2" "$3"
}
# json_field JSON ID FIELD: the same, from `thinfs layer ls --json` output already read.
json_field() {
  printf '%s\n' "$1" | awk -v id="$2" -v f="$3" '
    { l = $0; o = gsub(/[[{]/, "&", l); c = gsub(/[]}]/, "&", l) }
    depth == 2 && l ~ /^[ \t]*"/ {
      k = l; sub(/^[ \t]*"/, "", k); key = k; sub(/".*/, "", key)
      v = k; sub(/^[^"]*"[ \t]*:[ \t]*/, "", v); sub(/,[ \t]*$/, "", v); gsub(/"/, "", v)
      if (key == "id") cid = v
      if (key == f) cf = v
    }
    { depth += o - c; if (depth == 1 && c > 0) { if (cid == id || id == "*") print cf; cid = ""; cf = "" } }'
}

# layer_ids ROOT: the listed layer ids, sorted, space-separated.
layer_ids() { layer_field "$1" '*' id | sort | tr '\n' ' ' | sed 's/ $//'; }

# pool_table POOL: the thin-pool line of POOL's table (lvm2 may stack the pool under a linear
# POOL with the target in POOL-tpool).
pool_target() {
  if dmsetup table "$1" 2>/dev/null | grep -q ' thin-pool '; then echo "$1"
  elif dmsetup table "$1-tpool" 2>/dev/null | grep -q ' thin-pool '; then echo "$1-tpool"
  else vm_fail "no thin-pool target in $1 or $1-tpool: $(dmsetup table "$1" 2>&1)"; fi
}

# meta_node POOL: the /dev node of POOL's metadata device (a dm device or a loop device), from
# the major:minor in its thin-pool table.
meta_node() {
  local target mm
  target=$(pool_target "$1")
  mm=$(dmsetup table "$target" | awk '$3 == "thin-pool" {print $4}')
  [ -n "$mm" ] || vm_fail "no metadata device in the table of $target"
  if [ -f "/sys/dev/block/$mm/dm/name" ]; then echo "/dev/mapper/$(cat "/sys/dev/block/$mm/dm/name")"
  else echo "/dev/$(sed -n 's/^DEVNAME=//p' "/sys/dev/block/$mm/uevent")"; fi
}

# pool_devs POOL: the thin device ids in POOL's metadata, sorted, space-separated, as thin_dump
# reads them from a metadata snapshot of the live pool (reserve_metadata_snap commits first).
pool_devs() {
  local target meta xml rc=0
  target=$(pool_target "$1"); meta=$(meta_node "$1")
  dmsetup message "$target" 0 reserve_metadata_snap || vm_fail "reserve_metadata_snap on $target failed"
  xml=$(thin_dump -m "$meta" 2>&1) || rc=$?
  dmsetup message "$target" 0 release_metadata_snap || vm_fail "release_metadata_snap on $target failed"
  [ $rc = 0 ] || vm_fail "thin_dump -m $meta: $xml"
  printf '%s\n' "$xml" | sed -n 's/.*<device dev_id="\([0-9]*\)".*/\1/p' | sort -n | tr '\n' ' ' | sed 's/ $//'
}

# active_thins: the dm names of every active thin device (target type thin), sorted.
active_thins() { dmsetup ls --target thin 2>/dev/null | awk '$1 != "No" {print $1}' | sort | tr '\n' ' ' | sed 's/ $//'; }

# expect_fail PATTERN CMD...: CMD must fail, and its output must match the grep -E PATTERN.
expect_fail() {
  local pattern=$1 out rc=0; shift
  out=$("$@" 2>&1) || rc=$?
  echo "$out"
  [ $rc != 0 ] || vm_fail "'$*' succeeded; it should have failed with /$pattern/"
  echo "$out" | grep -Eq -- "$pattern" || vm_fail "'$*' failed (exit $rc) without /$pattern/ in its output"
}

# has_word LIST WORD: whether WORD is one of LIST's space-separated words.
has_word() { case " $1 " in *" $2 "*) return 0 ;; *) return 1 ;; esac; }

# wait_no_dm NAME [SECONDS]: waits until dm device NAME is gone; fails after SECONDS (default 10).
wait_no_dm() {
  local i
  for i in $(seq $(( ${2:-10} * 5 ))); do dmsetup info "$1" >/dev/null 2>&1 || return 0; sleep 0.2; done
  vm_fail "dm device $1 still exists after ${2:-10} s: $(dmsetup info "$1" 2>&1 | tr '\n' ' ')"
}

# mount_kind MOUNTPOINT: the filesystem type /proc/mounts gives MOUNTPOINT (empty if none).
mount_kind() { awk -v m="$1" '$2 == m {print $3}' /proc/mounts | tail -1; }
# mount_source MOUNTPOINT: the source /proc/mounts gives MOUNTPOINT.
mount_source() { awk -v m="$1" '$2 == m {print $1}' /proc/mounts | tail -1; }
