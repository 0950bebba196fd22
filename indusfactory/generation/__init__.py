"""Generation: the plan (one row per sample), sampling into shards, per-sample adherence QC and scorers."""
