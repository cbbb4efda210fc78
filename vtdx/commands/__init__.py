"""``vtdx`` subcommands, one module each; every module exposes ``register(subparsers)``.

A subcommand's ``register`` adds its parser and sets ``func`` (taking the parsed args and
returning an exit code) as the parser default.
"""

#: Modules under vtdx.commands, in the order ``vtdx --help`` lists them.
COMMANDS: tuple[str, ...] = ("setup", "build_kernel", "run", "console", "trace", "daemon")
