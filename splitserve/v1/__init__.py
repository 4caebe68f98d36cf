"""Generated gRPC stubs for package splitserve.v1.

Sources: proto/splitserve/v1/*.proto. Regenerate with `python scripts/gen_protos.py`;
tests/test_protos.py fails when these files are stale. Importing them never pulls torch.
"""
