"""Adapters to the outside world: PostgreSQL (pools, the shard router, migrations), the Redis
client, caches, pub/sub, rate limits, sessions, the HTTP/1 connection layer, image storage and
the image pipeline. They know no HTTP handler and no domain service; driver errors are turned
into the domain's error kinds here (`server.adapters.faults`)."""
