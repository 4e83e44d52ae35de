"""The one exception type of the conversion package."""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the file or tensor at fault."""


class DestinationExistsError(ConversionError):
    """DST already exists and replacing it was not asked for. The message gives the Python spelling (force=True);
    the command line says --force instead."""

    def __init__(self, dst, hint: str = "force=True"):
        self.dst = dst
        super().__init__(f"{dst} already exists; pass {hint} to replace it")


__all__ = ["ConversionError", "DestinationExistsError"]
