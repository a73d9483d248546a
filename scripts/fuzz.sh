#!/usr/bin/env bash
# Builds the libFuzzer harnesses of Fuzz/ (with AddressSanitizer) and runs each for a bounded time.
# See Fuzz/README.md for what each harness feeds and how to reproduce a crash.
#
#   FUZZ_SECONDS=N         seconds per harness (default 20, ten harnesses; try 600 or more on demand)
#   FUZZ_SEED=N            libFuzzer's -seed (default 1, so that CI repeats a run; 0 = a new random seed)
#   FUZZ_STRICT=1          a crash found by exploration fails the run too (by default only the replay of
#                          the checked-in corpus, which holds every earlier finding, decides the exit
#                          status; new findings are listed at the end for someone to fix and check in)
#   FUZZ_HARNESSES="a b"   which harnesses (default: all of them, in the order below)
#   FUZZ_SANITIZERS=S      -sanitize= value (default fuzzer,address; "fuzzer" alone builds faster)
#   FUZZ_NO_BUILD=1        use the binaries already built;  FUZZ_BUILD_ONLY=1: build, run nothing
#
# Each harness starts from its checked-in seeds (Fuzz/Corpus/<harness>, never written) and a
# working corpus (Fuzz/.build/corpus/<harness>) that keeps what earlier runs on this machine found.
# A crash, hang (-timeout) or out-of-memory input is saved as Fuzz/.build/artifacts/<harness>/*;
# the run goes on with the other harnesses, then fails, its last lines naming each harness and input.
set -euo pipefail
cd "$(dirname "$0")/../Fuzz"

all=(superblock btree space-map pool layer-tar image docker-dm control containerd docker-plugin)
read -r -a harnesses <<< "${FUZZ_HARNESSES:-${all[*]}}"
seconds=${FUZZ_SECONDS:-20}
seed=${FUZZ_SEED:-1}
sanitizers=${FUZZ_SANITIZERS:-fuzzer,address}
bin=.build/release

if [[ -z ${FUZZ_NO_BUILD:-} ]]; then
  echo "=== fuzz.sh: building the harnesses (-sanitize=$sanitizers)"
  start=$SECONDS
  mkdir -p .build/logs
  # Fuzz/Package.swift and the main Package.swift read the variable: our modules and the harnesses
  # are instrumented, the dependencies (gRPC, SwiftNIO, swift-protobuf, swift-crypto) build plainly.
  if ! THINFS_FUZZ_SANITIZE=$sanitizers swift build -c release > .build/logs/build.log 2>&1; then
    grep -E 'error:|warning:' .build/logs/build.log | head -n 40 | sed 's/^/    /'
    echo "=== fuzz.sh: FAILED: the harnesses did not build (errors above; full log $PWD/.build/logs/build.log)" >&2
    exit 1
  fi
  echo "=== fuzz.sh: built in $((SECONDS - start)) s"
fi
[[ -z ${FUZZ_BUILD_ONLY:-} ]] || exit 0

# Swift's runtime keeps allocations for the life of the process; leak reports would be noise.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:handle_abort=1:handle_sigill=1}
# A Swift trap on a thread other than the fuzzer's (a socket server's) is SIGILL: with Swift's own
# backtracer on, ASan reported the backtracer's memory reads (stack-buffer-underflow in
# CrashHandlerLinux.cpp) instead; off, ASan's handler prints the trap ("Swift runtime failure: ...").
export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}
summary=()
failures=()
findings=()
for h in "${harnesses[@]}"; do
  exe=$bin/fuzz-$h
  [[ -x $exe ]] || { failures+=("$h: no binary $exe (build it, or check FUZZ_HARNESSES)"); continue; }
  work=.build/corpus/$h artifacts=.build/artifacts/$h log=.build/logs/$h.log
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  # The checked-in corpus first, once each: the seeds and every earlier finding (regressions).
  echo "=== fuzz.sh: $h: replaying Corpus/$h"
  set +e
  "$exe" -runs=0 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -detect_leaks=0 \
    -artifact_prefix="$artifacts/replay-" "Corpus/$h" > "$log.replay" 2>&1
  replay=$?
  set -e
  if ((replay != 0)); then
    kind=$(grep -m1 -oE 'Fatal error: .{0,80}|Swift runtime failure: .{0,60}|SUMMARY: [A-Za-z]+: [a-z-]+|ERROR: libFuzzer: [a-z-]+' "$log.replay" | sed -E 's/^SUMMARY: //; s/^ERROR: //' || true)
    input=$(grep -oE 'Running: .*' "$log.replay" | tail -n 1 | sed 's/^Running: //' || true)
    tail -n 30 "$log.replay" | sed 's/^/    /'
    failures+=("$h: a checked-in input crashes: ${kind:-exit $replay}; ${input:+input $PWD/$input }(log $PWD/$log.replay)")
  fi
  echo "=== fuzz.sh: $h for $seconds s"
  set +e
  "$exe" -seed="$seed" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -detect_leaks=0 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$work" "Corpus/$h" > "$log" 2>&1
  rc=$?
  set -e
  # The last status line carries the coverage: "#123 DONE cov: 456 ft: 789 corp: 12/3Kb ..."
  status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<< "$status")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<< "$status")
  corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<< "$status")
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$log")
  rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+)/\1/p' "$log")
  result=ok
  if ((rc != 0)); then
    input=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
    # What went wrong, in a few words: Swift's trap message, or the sanitizer's or libFuzzer's verdict.
    kind=$(grep -m1 -oE 'Fatal error: .{0,80}|Swift runtime failure: .{0,60}|SUMMARY: [A-Za-z]+: [a-z-]+|ERROR: libFuzzer: [a-z-]+' "$log" | sed -E 's/^SUMMARY: //; s/^ERROR: //' || true)
    result="FAILED (${kind:-exit $rc})"
    tail -n 40 "$log" | sed 's/^/    /'
    findings+=("$h: ${kind:-exit $rc}; input ${input:+$PWD/$input} (log $PWD/$log)")
  fi
  summary+=("$(printf '%-12s %6s s %10s execs %8s execs/s  cov %6s  ft %7s  corpus %5s  %s' \
    "$h" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
done

echo "=== fuzz.sh: summary (-sanitize=$sanitizers)"
printf '    %s\n' "${summary[@]}"
if ((${#findings[@]} > 0)); then
  echo "=== fuzz.sh: NEW FINDINGS: ${#findings[@]} harness(es) found a crash while exploring; reproduce with Fuzz/.build/release/fuzz-<harness> <input>, fix, and add the input to Fuzz/Corpus/<harness>:" >&2
  for f in "${findings[@]}"; do echo "    $f" >&2; done
  [[ -n ${FUZZ_STRICT:-} ]] && failures+=("${findings[@]}")
fi
if ((${#failures[@]} > 0)); then
  echo "=== fuzz.sh: FAILED: ${#failures[@]} failure(s); reproduce with Fuzz/.build/release/fuzz-<harness> <input>:" >&2
  for f in "${failures[@]}"; do echo "    $f" >&2; done
  exit 1
fi
echo "=== fuzz.sh: every checked-in input of ${#harnesses[@]} harness(es) runs clean${findings:+ (new findings above)}"
