"""One module per CLI command: its arguments and the glue that runs a stage end to end."""
