"""Communication layer: the collectives protocol, the Horovod backend (the only place
Horovod is imported), simulated in-process ranks for tests, traffic accounting and the
gradient synchronizer."""
