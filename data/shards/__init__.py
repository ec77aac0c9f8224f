"""Dataset shards: the WebDataset + sidecar-index format (data/shards/webdataset.py), making shards from JSONL or
JSON records (make.py; other tools' formats through convert.py), filling the video cache ahead of training
(warm.py), and the CLI (`python -m data.shards`)."""

from data.shards.webdataset import (
    INDEX_SUFFIX,
    MANIFEST,
    ShardIndex,
    ShardWriter,
    check_header,
    index_dir,
    index_shard_file,
    index_tar,
    join_url,
    split_member,
    split_sample,
    write_manifest,
)

__all__ = [
    "INDEX_SUFFIX",
    "MANIFEST",
    "ShardIndex",
    "ShardWriter",
    "check_header",
    "index_dir",
    "index_shard_file",
    "index_tar",
    "join_url",
    "split_member",
    "split_sample",
    "write_manifest",
]
