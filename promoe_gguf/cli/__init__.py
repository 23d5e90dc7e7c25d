"""The `promoe` command."""
