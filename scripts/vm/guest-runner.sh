# Runs in the guest (run.sh's script for suite.sh): each named test's guest.sh in /share/NAME, one
# after another, each in a fresh bash with the device-mapper and loop state cleaned between them.
# Records each exit status in /share/NAME/.guest-status and prints marker lines.
. /share/.vm/lib.sh
failed=0
for t in "$@"; do
  echo "THINFS-TEST-BEGIN $t"
  begin=$(cut -d. -f1 /proc/uptime)
  (cd "/share/$t" && exec bash -o pipefail ./guest.sh) 2>&1 | tee "/share/$t/guest.log" | sed "s/^/[$t] /"
  rc=${PIPESTATUS[0]}
  echo "$rc" > "/share/$t/.guest-status"
  vm_dm_cleanup
  # What the test left for the next ones: memory and the tmpfs /tmp share the guest's RAM.
  echo "[$t] left: $(awk '/^MemAvailable/ {printf "%d MiB available", $2 / 1024}' /proc/meminfo), /tmp $(du -sm /tmp | cut -f1) MiB"
  echo "THINFS-TEST-END $t $rc $(( $(cut -d. -f1 /proc/uptime) - begin ))s"
  [ "$rc" = 0 ] || failed=1
done
exit $failed
