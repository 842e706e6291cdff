"""The `lifelong` command: a LightningCLI subclass plus extra subcommands (see `cli.main`)."""
