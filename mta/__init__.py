"""mta: high-throughput asynchronous bulk mail delivery daemon."""

__version__ = "0.1.0"
