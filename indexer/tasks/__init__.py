"""Pure functions over a collection (and an embedder for queries), one module per job: search (with
hybrid ranking), knn, probe, layers (which layer to index), dedup and finetune; features (labelled
vectors, folds, scores) and plots are the pieces they share."""
