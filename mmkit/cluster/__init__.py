"""CommonIT: group instruction data by Task / Embedding / Length; group-pure batches."""
