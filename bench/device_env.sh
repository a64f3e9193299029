# Sourced by the device call scripts (bench/results/*/call*.sh), run from the repository root on
# the device machine with .devbundle/ carried: unpacks the bundle that ../shared/device/bundle.sh
# wrote and sets R (the call's $OUT), T00 (its start), H (the bundle), HM (our hm). On exit it packs
# everything under $R into $R/all.tgz: a call brings back only 8 files (stop 36 lost the rest).
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf "$H"; mkdir -p "$H"; tar xJf .devbundle/hm.tar.xz -C "$H"
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
trap 'cd "$R" && tar czf /tmp/all.tgz . && rm -rf "${R:?}"/* && mv /tmp/all.tgz "$R"/all.tgz' EXIT
