"""The `dtrag` command: argument parsing and one module per group of commands."""
