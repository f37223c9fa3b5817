"""The index on storage: shard and segment formats, their readers, merges, versions, the neighbour
table and the image shortlist."""
