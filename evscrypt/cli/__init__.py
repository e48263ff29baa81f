"""The `evscrypt` command line: one module per command group.

``root`` builds the click root group and is the one place that turns errors
into a one-line message and an exit code; ``core`` is what the command line
does without click (see evscrypt.entry).  This package imports neither, so
the quick path pays only for ``core``.
"""
