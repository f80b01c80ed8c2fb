"""Operator tools on the node: ``nodemedic status``, ``diagnose`` and ``replay``. Each module adds
its own subcommand (``add_command``) and is called only by cli.py."""
