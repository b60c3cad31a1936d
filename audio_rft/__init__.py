"""audio-rft: reinforcement fine-tuning of audio language models on audio question answering."""

__version__ = "0.1.0"


class UserError(ValueError):
    """A mistake in the user's input or config: printed as one line, exit status 2, no traceback."""
