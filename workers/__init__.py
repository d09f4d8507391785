"""convray's worker side: the CNN family, the model repository, Ray replicas and training.

Imports go one way: ``convray.service`` may import from here, never the reverse.
"""
