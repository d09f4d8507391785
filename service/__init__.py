"""convray's front end: the gRPC server, dynamic batching, metrics and the ``convray`` CLI."""

__version__ = "0.1.0"
