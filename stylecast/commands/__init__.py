"""CLI subcommands, one module each, imported only when their subcommand runs."""
