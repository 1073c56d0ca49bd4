"""Command-line interface: one module per command (``register`` builds the parser, ``run`` executes).

Command modules import only the standard library at module level, so that
``robkd --help`` stays fast; heavy imports happen inside ``run``.
"""
