#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of peer input with AFL++ and SharpFuzz.
#
#   ./fuzz.sh <target|all> [seconds per target, default 600] [--resume]
#
# Installs what is missing (AFL++ from Debian's packages when run as root; the sharpfuzz dotnet tool
# from the repo's tool manifest), builds the fuzzer into out/bin, instruments the assemblies under test
# there, and runs afl-fuzz on each target in turn (one at a time, at nice 10), seeded with
# corpus/<target>. Findings go to findings/<target>/default/{crashes,hangs,queue}; each run appends a
# line (time, execs, paths, coverage, crashes, hangs) to findings/summary.tsv. Replay a finding with an
# ordinary build (out/bin's instrumented assemblies write coverage into AFL's shared memory, which only
# afl-fuzz sets up: run outside it, they fail with an AccessViolationException):
#   dotnet run -c Release --project tests/OffloadRpc.Fuzz -- replay <target> findings/<target>/default/crashes
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${1:-}
seconds=${2:-600}
resume=${3:-}
targets="handshake frames ring stub reply metadata grpc"
if [ -z "$target" ] || { [ "$target" != all ] && ! grep -qw -- "$target" <<<"$targets"; }; then
  echo "usage: $0 <all|${targets// /|}> [seconds per target] [--resume]" >&2
  exit 2
fi
[ "$target" = all ] && target=$targets

# AFL++: from Debian's packages when missing.
if ! command -v afl-fuzz >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq afl++ >/dev/null
  else
    echo "afl-fuzz is missing: install AFL++ (as root: apt-get install afl++)" >&2
    exit 1
  fi
fi

# The SharpFuzz instrumenter, pinned in .config/dotnet-tools.json.
(cd "$root" && dotnet tool restore >/dev/null)

# Build into a folder of its own, so instrumented copies never mix with an ordinary build.
out="$here/out/bin"
rm -rf "$out"
dotnet build "$here/OffloadRpc.Fuzz.csproj" -c Debug -o "$out" -nologo -v quiet -p:TreatWarningsAsErrors=false >/dev/null
# The assemblies whose code reads peer input: the runtime, the gRPC client and wire, MessagePack, and the generated stubs and
# proxies (of the test contracts and of the fuzz contract). Never the harness itself (OffloadRpc.Fuzz.dll).
for dll in OffloadRpc.dll OffloadRpc.Grpc.Client.dll MessagePack.dll OffloadRpc.TestContracts.dll OffloadRpc.Fuzz.Contracts.dll; do
  (cd "$root" && dotnet sharpfuzz "$out/$dll" >/dev/null)
done

export AFL_SKIP_BIN_CHECK=1                      # the target is `dotnet`, instrumented by SharpFuzz, not by afl-cc
export AFL_SKIP_CPUFREQ=1                        # a VM: no CPU frequency governor to check
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1   # core_pattern may pipe to a handler; crashes are still caught
export AFL_NO_AFFINITY=1                         # shared cores: do not pin to one that others use
export AFL_NO_UI=1
export AFL_FORKSRV_INIT_TMOUT=60000              # the runtime takes a while to start
export DOTNET_TieredPGO=0

mkdir -p "$here/findings"
summary="$here/findings/summary.tsv"
[ -f "$summary" ] || printf 'date\ttarget\tseconds\texecs\texecs_per_sec\tpaths\tcoverage\tcrashes\thangs\n' >"$summary"
for t in $target; do
  findings="$here/findings/$t"
  input="$here/corpus/$t"
  if [ "$resume" = --resume ] && [ -d "$findings/default/queue" ]; then
    input=-
  else
    rm -rf "$findings"
  fi

  echo "fuzzing $t for $seconds s (findings in $findings)"
  # -t: one input may take 5 s (a stalled pipelined payload costs 0.1 s; a hang is far longer).
  nice -n 10 timeout --signal=INT $((seconds + 120)) \
    afl-fuzz -i "$input" -o "$findings" -V "$seconds" -t 5000 -m none -- dotnet "$out/OffloadRpc.Fuzz.dll" "$t" \
    >"$here/findings/$t.log" 2>&1 || true
  stats="$findings/default/fuzzer_stats"
  if [ ! -f "$stats" ]; then
    echo "afl-fuzz did not start for $t; see $here/findings/$t.log" >&2
    tail -20 "$here/findings/$t.log" >&2
    exit 1
  fi

  get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$(get run_time)" "$(get execs_done)" "$(get execs_per_sec)" \
    "$(get corpus_count)" "$(get bitmap_cvg)" "$(get saved_crashes)" "$(get saved_hangs)" | tee -a "$summary"
done
