#!/usr/bin/env bash
# Set up, write the sample corpus (real photos shipped by scikit-image / scikit-learn, labelled texts),
# ingest it into two LanceDB collections, and search each by a text query and by an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
ix=.venv/bin/indexer
$ix sample sample -q
$ix ingest sample/texts.idx sample/texts.jsonl --model minilm
$ix ingest sample/images.idx sample/images --model efficientnet-lite0
echo; echo '$ indexer search sample/texts.idx "how do plants turn sunlight into food" -k 3'
$ix search sample/texts.idx "how do plants turn sunlight into food" -k 3
echo; echo '$ indexer search sample/images.idx --image sample/queries/cat-edited.jpg -k 3'
$ix search sample/images.idx --image sample/queries/cat-edited.jpg -k 3
echo; echo '$ indexer knn sample/texts.idx --eval      # k-NN classifier on the frozen features, 5-fold CV'
$ix knn sample/texts.idx --eval -q
echo; echo "indexer is installed in .venv/bin: 'source .venv/bin/activate' puts it on your PATH"
