"""The one exception type of the conversion package."""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the file or tensor at fault."""


__all__ = ["ConversionError"]
