"""The `phivault` command line: one module per command group."""
