from .cli.root import entry

entry()
