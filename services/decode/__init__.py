"""Decode worker: runs the BATON engine, splices KV received over gRPC, streams tokens."""
