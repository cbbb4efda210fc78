"""The ``vtdx`` command line: ``vtdx.cli.main`` plus one module per subcommand.

Imports: anything in the product; nothing imports it.
"""
