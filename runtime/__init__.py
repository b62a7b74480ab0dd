"""Runtime: compile a graph into a module, carry its state, train it, generate with it."""

from .module import CompiledModel, InputError, Output, compile
from .session import DecodeSession, SessionError
from .state import State, StateError

__all__ = [
    "CompiledModel",
    "DecodeSession",
    "InputError",
    "Output",
    "SessionError",
    "State",
    "StateError",
    "compile",
]
