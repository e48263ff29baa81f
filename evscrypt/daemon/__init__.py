"""The evscrypt daemon: FUSE exposure of attached volumes, control socket."""
