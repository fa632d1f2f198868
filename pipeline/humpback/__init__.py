"""Humpback self-augmentation (Li et al. 2023, arXiv 2308.06259) as resumable stages: `make humpback-N`.

    seed        first-turn rank-0 English oasst1 pairs -> the seed model M0 and the backward model M_yx
    passages    C4 documents, deduplicated and length-filtered, in shards
    generated   M_yx writes the instruction each passage answers (nucleus sampling), shard by shard
    scored      M0 rates each (instruction, passage) pair, ending with `Score: N`, shard by shard
    curated     pairs at or above the threshold, as a Hub-layout dataset the `humpback` data source reads

Each shard is written whole with a manifest entry (its inputs' hash, counts, time); a rerun skips
finished shards and the trainer resumes its own checkpoints, so a killed run loses at most one shard.
"""
