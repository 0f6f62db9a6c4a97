"""A CPU stand-in for CUDA Graph capture: record the aten ops a function runs, then replay them.

Used by ``emulate_graphs=True`` (graphs.py) for eager splits. Like a CUDA Graph, a recording

* reads every tensor that existed before the capture by reference: a replay sees the values they
  hold then (static input buffers, weights copied in place, LoRA scale buffers);
* makes anew every tensor the function made, by running the same ops;
* keeps every Python value the function computed while it was recorded as a constant: shapes,
  flags, and scalars read from attributes (FreeU's factors, say). A setting changed after the
  capture is not seen by a replay, here as on a GPU, so the CPU tests see stale graphs too.

It records below autograd and composite ops (a ``TorchDispatchMode``), at a few microseconds per
op: torch's own ``make_fx`` records the same ops but builds fake tensors and stack traces for
each, 50 times slower than running the split.

It also notes which tensors from before the capture the function wrote into (`written_inputs`):
a captured graph that writes into its inputs changes them at every replay, which its caller must
allow for (FreeU scales the kept features in place; see graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class _Made:
    """Stands for the tensor a recorded op made at capture; `index` into the replay's values."""

    index: int


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.tape: list[tuple[Any, Any, Any, list[int]]] = []  # (op, args, kwargs, output indices)
        self.index_of: dict[int, int] = {}  # id() of each tensor made during the capture
        self.made: list[Tensor] = []  # those tensors, kept alive so that their ids stay unique
        # Storages of the tensors from before the capture that ops read, by data pointer (a view
        # made during the capture shares its base's storage), and those an op wrote into.
        self.input_storages: dict[int, Tensor] = {}
        self.written: dict[int, Tensor] = {}

    def encode(self, value: Any) -> Any:
        if isinstance(value, Tensor) and id(value) in self.index_of:
            return _Made(self.index_of[id(value)])
        return value  # a tensor from before the capture (by reference) or a Python value (a constant)

    def note_inputs(self, func: Any, args: Any, kwargs: Any) -> None:
        """Remember the storages of tensors from before the capture, and writes into them."""
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and id(leaf) not in self.index_of:
                pointer = leaf.untyped_storage().data_ptr()
                if pointer:
                    self.input_storages.setdefault(pointer, leaf)
        schema = func._schema
        named = dict(zip((argument.name for argument in schema.arguments), args), **kwargs)
        for argument in schema.arguments:
            value = named.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, Tensor):
                pointer = value.untyped_storage().data_ptr()
                if pointer in self.input_storages:
                    self.written.setdefault(pointer, self.input_storages[pointer])

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.note_inputs(func, args, kwargs)
        # Encoded before the outputs are numbered: an in-place op returns its own input.
        entry = (func, tree_map(self.encode, args), tree_map(self.encode, kwargs))
        result = func(*args, **kwargs)
        outputs = []
        for leaf in tree_leaves(result):
            if isinstance(leaf, Tensor):
                outputs.append(len(self.made))
                self.index_of[id(leaf)] = len(self.made)
                self.made.append(leaf)
        self.tape.append((*entry, outputs))
        return result


class Recording:
    """`function`'s ops, recorded by running it once; calling the recording replays them."""

    def __init__(self, function: Callable[[], Any]) -> None:
        recorder = _Recorder()
        with recorder:
            result = function()
        self._tape = recorder.tape
        self._size = len(recorder.made)
        self._result = tree_map(recorder.encode, result)
        self.first_result = result  # what the recorded run returned
        # Tensors from before the capture that the function wrote into (each replay writes again).
        self.written_inputs: list[Tensor] = list(recorder.written.values())

    def __call__(self) -> Any:
        values: list[Any] = [None] * self._size

        def decode(value: Any) -> Any:
            return values[value.index] if isinstance(value, _Made) else value

        for func, args, kwargs, outputs in self._tape:
            result = func(*tree_map(decode, args), **tree_map(decode, kwargs))
            made = [leaf for leaf in tree_leaves(result) if isinstance(leaf, Tensor)]
            for index, tensor in zip(outputs, made):
                values[index] = tensor
        return tree_map(decode, self._result)
