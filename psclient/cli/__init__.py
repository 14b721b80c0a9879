"""The command lines' own layer: the click options every command shares, the `psclient` CLI."""
