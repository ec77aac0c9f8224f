"""The data loader: ChatML / pretraining samples from WebDataset shards (local, s3://, oss://) and megatron
indexed text to packed microbatches (core.batch.PackedBatch), with exact resume.

Entry points: data.config (DataConfig, DatasetSpec), data.loader (build_loader, Loader: the public API is in its
docstring), `python -m data.shards make|index`, `python -m data.inspect`. User-facing format: docs/data.md.
"""
