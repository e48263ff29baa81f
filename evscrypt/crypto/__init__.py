"""Cryptographic primitives: the XTS sector cipher and the key derivations."""
