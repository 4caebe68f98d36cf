"""The bottom layer every other SplitServe package may import (torch-free, no engine):
the env registry, shared request and result types, the cluster records, the KV layout
record, proto <-> domain conversion (`convert`), gRPC server helpers and error mapping, and
metrics exposition. It imports nothing of SplitServe but the generated stubs."""
