"""The wire layer: generated protobuf code (`proto`), numpy <-> bytes (`codec`), records as msgpack
(`records`), and which shard holds an id (`partition`). The servers import it as well as the SDK."""
