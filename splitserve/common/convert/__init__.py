"""Every proto <-> domain conversion, one module per .proto file (`common`, `cluster`,
`router`), each function named `<thing>_to_proto` or `<thing>_from_proto`."""
