"""The backing image: header format, geometry, the sector engine, sparse
copies and transcoding between encryptions."""
