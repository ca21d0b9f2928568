"""The error a training run raises for a problem the user can act on."""


class TrainError(Exception):
    """A run that cannot go on for a reason the user can act on; the message says which."""
