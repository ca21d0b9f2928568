"""How readers split a source: the one sharding rule every file-based source uses."""
from __future__ import annotations


def file_shares(shard: int, num_shards: int, n_files: int) -> list[tuple[int, int, int]]:
    """Which files reader `shard` of `num_shards` reads, for a source made of `n_files`
    files: a list of (file index, g, j), meaning "the records at positions p % g == j
    within that file". With at least as many files as readers, each reader gets whole
    files (f % num_shards == shard: no two readers open the same file); with fewer, each
    file is shared by the readers k with k % n_files == f, split by position. Either way
    the shares are disjoint and cover every record. With one file this is p % num_shards."""
    if num_shards <= 1 or n_files <= 0:
        return [(f, 1, 0) for f in range(max(n_files, 0))]
    if n_files >= num_shards:
        return [(f, 1, 0) for f in range(shard, n_files, num_shards)]
    f = shard % n_files
    group = len(range(f, num_shards, n_files))  # readers sharing file f
    return [(f, group, shard // n_files)]
