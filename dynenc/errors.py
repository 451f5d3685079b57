"""dynenc's own exception types. Bad arguments raise ``TypeError`` (wrong kind) or
``ValueError`` (wrong value); these name the faults of a run that no argument check can see.
The ``dynenc`` command line prints each as one line and exits 2, like a bad argument."""

__all__ = ["NonFiniteTraining", "RunDirectoryLocked"]


class RunDirectoryLocked(RuntimeError):
    """Another job holds the run directory's lock (:mod:`dynenc.runlock`)."""


class NonFiniteTraining(RuntimeError):
    """Training produced non-finite losses, gradients or weights and stopped; no checkpoint
    holds non-finite weights."""
