"""The backing image: header format, geometry and the sector engine."""
