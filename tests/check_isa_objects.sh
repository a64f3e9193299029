#!/usr/bin/env bash
# One binary for every x86-64 CPU (kernels/cpu/dispatch.h): checks with objdump that
#  1. no baseline object (all of hm_core and hm but the avx2 / avx512 kernel files) holds an
#     AVX instruction (a VEX/EVEX mnemonic, or a ymm, zmm or mask register);
#  2. in the linked binary, every function holding one is per-ISA code: named in
#     hm::cpu::avx2 / hm::cpu::avx512 (templates included: their ISA tag is in the name), or
#     defined by a per-ISA object as a file-local or strong symbol (nm t / T: no other file can
#     hold a copy of it), or a GCC target_clones copy (the loader picks it by CPU). Anything else is a weak symbol, an inline function or template that
#     baseline code may share, whose AVX copy the linker kept: it would die with an illegal
#     instruction on a CPU without that ISA.
# Usage: check_isa_objects.sh BUILD_DIR BINARY...
set -euo pipefail
build=$1
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Function name, then its AVX instructions' count, for every function of the object code given.
avx_functions() {
  objdump -d -C --no-show-raw-insn "$@" | awk '
    /^[0-9a-f]+ <.*>:$/ { if (fn != "" && n > 0) print n "\t" fn; fn = substr($0, index($0, "<") + 1); sub(/>:$/, "", fn); n = 0; next }
    /^ +[0-9a-f]+:\t/ { split($0, f, "\t"); if (f[2] ~ /^v/ || f[2] ~ /%[yz]mm|%k[0-7]/) n++ }
    END { if (fn != "" && n > 0) print n "\t" fn }'
}

# A GCC target_clones copy ([[gnu::target_clones]]): the loader picks it by CPU, so it is allowed.
clone='\[clone \.(avx|arch_x86_64)[^]]*\]$'

per_isa=()
baseline=()
while IFS= read -r o; do
  case "$o" in
    */hm_kernels_avx2.dir/* | */hm_kernels_avx512.dir/* | */quant_avx2.cpp.o | */quant_avx512.cpp.o) per_isa+=("$o") ;;
    *) baseline+=("$o") ;;
  esac
done < <(find "$build/CMakeFiles/hm_core.dir" "$build/CMakeFiles/hm_kernels_scalar.dir" \
              "$build/CMakeFiles/hm_kernels_avx2.dir" "$build/CMakeFiles/hm_kernels_avx512.dir" \
              "$build/CMakeFiles/hm.dir" -name '*.o' | sort)
if [ "${#per_isa[@]}" -lt 14 ] || [ "${#baseline[@]}" -lt 20 ]; then
  echo "FAIL: found ${#per_isa[@]} per-ISA and ${#baseline[@]} baseline objects under $build" >&2
  exit 1
fi

status=0
avx_functions "${baseline[@]}" | grep -Ev "$clone" > "$tmp/baseline" || true
if [ -s "$tmp/baseline" ]; then
  echo "FAIL: AVX instructions in baseline objects (count, function):" >&2
  head -20 "$tmp/baseline" >&2
  status=1
fi

# Functions only the per-ISA objects can define (file-local or strong).
nm -C --defined-only "${per_isa[@]}" 2>/dev/null | awk '$2 == "t" || $2 == "T" { $1 = ""; $2 = ""; sub(/^  /, ""); print }' \
  | sort -u > "$tmp/local"
for bin in "$@"; do
  avx_functions "$bin" | grep -Ev "$clone" | awk -F'\t' -v local="$tmp/local" '
    BEGIN { while ((getline l < local) > 0) ok[l] = 1 }
    $2 ~ /hm::cpu::(avx2|avx512)::/ { next }
    { base = $2; sub(/ \[clone [^]]*\]$/, "", base); if (base in ok || $2 in ok) next; print }' > "$tmp/shared"
  total=$(avx_functions "$bin" | wc -l)
  if [ -s "$tmp/shared" ]; then
    echo "FAIL: $bin: AVX code outside the dispatched functions (count, function):" >&2
    head -20 "$tmp/shared" >&2
    status=1
  else
    echo "ok: $bin: $total functions hold AVX instructions, all per-ISA"
  fi
done
[ "$status" -eq 0 ] && echo "ok: ${#baseline[@]} baseline objects hold no AVX instruction"
exit "$status"
