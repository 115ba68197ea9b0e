"""The frozen encoders the loader ranks run (autoencoder, text encoders, the pooled vector) and the
random-weight stand-ins of the CPU demo and the tests."""
