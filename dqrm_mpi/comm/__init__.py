"""Communication layer: the Horovod backend (the only place Horovod is imported),
traffic accounting and the gradient synchronizer."""
