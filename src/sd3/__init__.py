"""SD3-style MMDiT trained from scratch with rectified flow; loader ranks encode, model ranks train."""

__version__ = "0.1.0"
