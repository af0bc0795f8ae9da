"""bulkdet: offline bulk object detection over packed image archives."""

__version__ = "0.1.0"
