"""evscrypt: cloud-style (EVS/EBS) volume encryption for a single Linux host."""

__version__ = "0.1.0"
