"""Errors a user can cause. Each carries a one-line message naming what and where."""


class IRError(Exception):
    """Base of every error about a graph or its text."""


class VerifyError(IRError):
    """A graph is malformed: the message names the node, the op and expected vs actual."""


class ParseError(IRError):
    """IR text does not parse: the message names the line and column."""


class ShapeError(Exception):
    """Raised by an op's type rule; the verifier prefixes the node it came from."""
