"""gRPC plumbing: server building and channels (`serving`), TLS and tokens (`security`), failed
calls as one line (`errors`), the connect-time layout checks (`layout`), and the clients of the
shards' streams: one async stream per shard (`connection`), the blocking batch API (`shard_group`)."""
