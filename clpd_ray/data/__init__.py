"""Data: examples, the embedded task, dataset loaders, tokenizers, vocabulary checks, batching."""
