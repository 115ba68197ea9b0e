"""Distribution: which rank loads and which trains (rank map, runtime), how a batch travels from a
loader rank to its model ranks (batch contract, transport, batch sources), the loader role itself, and
what wraps the model for data parallelism."""
