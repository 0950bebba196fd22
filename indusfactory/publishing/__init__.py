"""Publishing: a dataset version from finished shards (manifest, card, COCO, `latest` pointer)."""
