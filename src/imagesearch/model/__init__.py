"""The model layer: spec parsing and loading, encoders, runtimes, the text tower, batching and image decoding.

Knows nothing of gRPC or stores.
"""
