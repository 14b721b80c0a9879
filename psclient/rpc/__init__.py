"""gRPC plumbing: server building and channels (`serving`), TLS and tokens (`security`), and the
client of the shards' streams (`shard_client`)."""
