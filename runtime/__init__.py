"""Runtime: compile a graph into a module, carry its state, train it, generate with it."""

from .module import CompiledModel, InputError, Output, compile
from .state import State, StateError

__all__ = ["CompiledModel", "InputError", "Output", "State", "StateError", "compile"]
