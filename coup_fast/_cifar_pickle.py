"""A pickle reader that builds CIFAR's python-version batches and nothing else.

A real batch file (``cifar-10-batches-py/data_batch_1`` .. ``test_batch``, ``cifar-100-python/
train``, ``test``) is a protocol-2 pickle that Python 2's cPickle wrote: one dict with byte-string
keys

- ``b'data'``: a numpy uint8 (N, 3072) array, pickled as
  ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` and then BUILD with
  ``(1, (N, 3072), dtype('u1'), False, <N * 3072 bytes>)``, where the dtype is
  ``numpy.dtype('u1', 0, 1)`` with BUILD ``(3, '|', None, None, None, -1, -1, 0)``;
- ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` and ``b'coarse_labels'`` (CIFAR-100): lists of
  N ints; ``b'filenames'``: a list of N byte strings; ``b'batch_label'``: a byte string.

Copies that Python 3 re-pickled carry the same structure, with bytes written as
``_codecs.encode(str, 'latin1')`` (protocol 2, and ``__builtin__.bytes()`` for b'') or as
BINBYTES (protocols 3 and 4), ``numpy._core`` for ``numpy.core`` under numpy 2, and labels that
were numpy integers as ``numpy.core.multiarray.scalar(dtype('i8'), <8 bytes>)``.

Why not a ``pickle.Unpickler`` subclass: its only hook is ``find_class``.  The C unpickler answers
a memo fetch (GET) internally, so a subclass cannot see that a list is referenced twice, and a few
hundred bytes of lists that share one another through the memo describe 2**60 elements, which
``np.asarray`` then expands; and the globals it resolves are *called*, so its safety would rest on
every argument numpy's ``_reconstruct`` and ``dtype`` accept.  Here :func:`pickletools.genops`
reads the opcodes (it executes nothing) and :func:`read_cifar_pickle` interprets them by hand:

- globals are names, never called: the array is built by ``np.frombuffer`` from a checked shape
  and byte count, only uint8 arrays are built, and numpy scalars (of number types only) become
  Python numbers;
- a list, dict, tuple or array fetched from the memo is refused (no sharing, so the result is a
  tree no larger than the file), lists hold numbers and strings only, dicts no dicts;
- the opcodes read are counted against a bound from the number of images (a real file has about
  ten per image), so the objects built are bounded before any of them exists.
"""
from __future__ import annotations

import math
import pickle
import pickletools
import re

import numpy as np

__all__ = ["CifarPickleError", "read_cifar_pickle"]

# Opcodes a real file has per image: a label (two for CIFAR-100) and a file name, 3 or 4 in all.  A
# protocol-2 re-pickle writes a name as _codecs.encode(...) in about 8 opcodes and a label that
# was a numpy integer as numpy's scalar(dtype, bytes) in about 14: 32 per image leaves room; 4096
# more for the dict, the keys and the array's construction.
OPCODES_PER_IMAGE = 32
OPCODES_FIXED = 4096
PIXELS_PER_IMAGE = 3072

_RECONSTRUCT, _NDARRAY, _DTYPE, _SCALAR = "_reconstruct", "ndarray", "dtype", "scalar"
_ENCODE, _BYTES = "encode", "bytes"
# (module, name) -> what it stands for; numpy 2 renamed numpy.core to numpy._core, Python 3 __builtin__
# to builtins, and a pickle may name either.
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,  # a label re-pickled from a numpy integer
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _ENCODE,
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}
_LEAVES = (type(None), bool, int, float, bytes, str)
_STRINGS = ("STRING", "BINSTRING", "SHORT_BINSTRING")  # Python 2 str: genops gives them latin-1 decoded
_BYTES_OPS = ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8")
_UNICODE_OPS = ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")
_INT_OPS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT")
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_NUMBER_DTYPE = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")  # bool, integers, floats: no objects, no records


class CifarPickleError(ValueError, pickle.UnpicklingError):
    """A CIFAR batch that is not what the real files hold (a ValueError, and an UnpicklingError)."""


class _Global:
    def __init__(self, what: str):
        self.what = what


class _Dtype:
    """numpy.dtype(spec, align, copy) as pickled, a number type only; BUILD gives its byte order."""

    def __init__(self, spec: str):
        self.spec, self.order = spec, "="

    def numpy(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder(self.order if self.order in "<>" else "=")


class _ArrayStub:
    """_reconstruct(ndarray, (0,), b'b'): the array before BUILD gives its shape and bytes."""


_SHAREABLE = (_LEAVES, _Global, _Dtype)  # immutable: a memo fetch of these expands nothing


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class _Reader:
    def __init__(self, max_images: int):
        self.max_pixels = max_images * PIXELS_PER_IMAGE
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict = {}
        self.pos = 0

    def fail(self, message: str) -> CifarPickleError:
        return CifarPickleError(f"byte {self.pos}: {message}")

    # --------------------------------------------------------------------- the stack
    def pop(self):
        if not self.stack or (self.marks and len(self.stack) == self.marks[-1]):
            raise self.fail("the pickle pops more than it pushed")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise self.fail("no MARK before a mark-terminated opcode")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def top(self):
        if not self.stack:
            raise self.fail("the pickle's stack is empty")
        return self.stack[-1]

    # --------------------------------------------------------------------- containers
    def append(self, target, items: list) -> None:
        if type(target) is not list:
            raise self.fail(f"APPEND to a {type(target).__name__}")
        for item in items:
            if not isinstance(item, _LEAVES):
                raise self.fail(f"a list holding a {type(item).__name__}: CIFAR's lists hold numbers and names only")
        target.extend(items)

    def set_items(self, target, items: list) -> None:
        if type(target) is not dict or len(items) % 2:
            raise self.fail("SETITEM(S) on something that is not a dict, or with a key without a value")
        for key, value in zip(items[::2], items[1::2]):
            if not isinstance(key, (bytes, str)):
                raise self.fail(f"a dict key that is a {type(key).__name__}, not a string")
            if not isinstance(value, (*_LEAVES, list, np.ndarray)):
                raise self.fail(f"the value of {_short(key)} is a {type(value).__name__}: a CIFAR batch maps "
                                "names to strings, numbers, lists and the uint8 pixel array only")
            target[key] = value

    def fetch(self, index):
        if index not in self.memo:
            raise self.fail(f"memo entry {index} fetched before it was stored")
        value = self.memo[index]
        if not isinstance(value, _SHAREABLE):
            # The memo bomb: lists that hold one another many times over.  A real file never refers
            # to one container twice.
            raise self.fail(f"a {type(value).__name__} referred to a second time (memo entry {index}): "
                            "a CIFAR batch shares no lists, dicts or arrays, and shared ones can describe "
                            "far more elements than the file holds")
        return value

    # --------------------------------------------------------------------- globals, REDUCE, BUILD
    def resolve(self, module, name) -> _Global:
        if not (isinstance(module, str) and isinstance(name, str)) or (module, name) not in _GLOBALS:
            raise self.fail(f"refusing to load global {str(module)[:60]}.{str(name)[:60]} from a CIFAR pickle "
                            "(only numpy's uint8 array, number scalars and byte strings are built)")
        return _Global(_GLOBALS[module, name])

    def reduce(self, func, args):
        what = func.what if isinstance(func, _Global) else None
        if not isinstance(args, tuple):
            raise self.fail("REDUCE with arguments that are not a tuple")
        if what == _ENCODE and len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise self.fail("_codecs.encode of a string beyond latin-1") from None
        if what == _BYTES and args == ():
            return b""
        if what == _RECONSTRUCT and len(args) == 3 and isinstance(args[0], _Global) and args[0].what == _NDARRAY:
            return _ArrayStub()
        if what == _DTYPE and len(args) == 3 and isinstance(args[0], (bytes, str)):
            spec = args[0].decode("latin-1") if isinstance(args[0], bytes) else args[0]
            if not _NUMBER_DTYPE.fullmatch(spec):
                raise self.fail(f"a numpy dtype {_short(spec)}: only number types are built")
            return _Dtype(spec)
        if what == _SCALAR and len(args) == 2 and isinstance(args[0], _Dtype) and isinstance(args[1], bytes):
            dtype = args[0].numpy()
            if len(args[1]) != dtype.itemsize:
                raise self.fail(f"a numpy {dtype} scalar of {len(args[1])} bytes")
            return np.frombuffer(args[1], dtype)[0].item()  # the Python int, float or bool
        raise self.fail(f"a call the CIFAR files do not make ({what or type(func).__name__} with "
                        f"{len(args)} arguments)")

    def build(self, obj, state):
        if isinstance(obj, _Dtype) and isinstance(state, tuple) and len(state) >= 2:
            order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
            if order not in ("<", ">", "|", "="):
                raise self.fail(f"a numpy dtype of byte order {_short(order)}")
            obj.order = order
            return obj
        if isinstance(obj, _ArrayStub):
            return self.array(state)
        raise self.fail(f"BUILD of a {type(obj).__name__}: the CIFAR files build only the pixel array")

    def array(self, state) -> np.ndarray:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _Dtype)):
            raise self.fail("the array's state is not (version, shape, dtype, fortran order, bytes)")
        _, shape, dtype, fortran, data = state
        if dtype.numpy() != np.uint8:
            raise self.fail(f"an array of dtype {dtype.numpy()}: only uint8 arrays (CIFAR's pixels) are accepted")
        if (not isinstance(shape, tuple) or not 1 <= len(shape) <= 2
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise self.fail(f"the array's shape {_short(shape)} is not one or two sizes")
        count = math.prod(shape)
        if count > self.max_pixels:
            raise self.fail(f"an array of {count:,} pixels: more than the file's images can hold "
                            f"({self.max_pixels:,})")
        if not isinstance(data, bytes) or len(data) != count:
            raise self.fail(f"the array of shape {shape} holds {len(data) if isinstance(data, bytes) else '?'} "
                            f"bytes, expected {count:,}")
        return np.frombuffer(data, np.uint8).reshape(shape, order="F" if fortran else "C")

    # --------------------------------------------------------------------- one opcode
    def step(self, name: str, arg) -> None:
        push = self.stack.append
        if name in _CONSTANTS:
            push(_CONSTANTS[name])
        elif name in _INT_OPS or name in _UNICODE_OPS or name in _BYTES_OPS:
            push(arg)
        elif name in _STRINGS:
            push(arg.encode("latin-1"))  # Python 2 str, read with encoding='bytes'
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            push(self.fetch(arg))
        elif name == "EMPTY_LIST":
            push([])
        elif name == "LIST":
            items, new = self.pop_mark(), []
            self.append(new, items)
            push(new)
        elif name == "APPEND":
            item = self.pop()
            self.append(self.top(), [item])
        elif name == "APPENDS":
            items = self.pop_mark()
            self.append(self.top(), items)
        elif name == "EMPTY_DICT":
            push({})
        elif name == "DICT":
            items, d = self.pop_mark(), {}
            self.set_items(d, items)
            push(d)
        elif name == "SETITEM":
            value, key = self.pop(), self.pop()
            self.set_items(self.top(), [key, value])
        elif name == "SETITEMS":
            items = self.pop_mark()
            self.set_items(self.top(), items)
        elif name == "EMPTY_TUPLE":
            push(())
        elif name == "TUPLE":
            push(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))]
            push(tuple(reversed(items)))
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            push(self.resolve(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            push(self.resolve(module, attr))
        elif name == "REDUCE":
            args = self.pop()
            push(self.reduce(self.pop(), args))
        elif name == "BUILD":
            state = self.pop()
            push(self.build(self.pop(), state))
        else:  # objects, extensions, persistent ids, sets, bytearrays, out-of-band buffers, DUP
            raise self.fail(f"opcode {name}: not something a CIFAR batch holds")


def read_cifar_pickle(data: bytes, max_images: int) -> dict:
    """The dict a CIFAR python-version batch pickles, built without running anything in it.

    Args:
        data: the file's bytes (already bounded by the caller).
        max_images: the most images the file may hold; bounds the opcodes read
            (``OPCODES_PER_IMAGE`` per image plus ``OPCODES_FIXED``) and the pixels.
    Returns:
        {bytes or str key: bytes | str | int | float | bool | None | list of those | uint8 ndarray}.
    Raises:
        CifarPickleError (a ValueError): anything else, a shared container, a refused global
            (named), too many opcodes, or a damaged stream.
    """
    reader = _Reader(max_images)
    budget = OPCODES_PER_IMAGE * max_images + OPCODES_FIXED
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
            reader.pos = pos
            if count >= budget:
                raise reader.fail(f"more than {budget:,} opcodes: more than a file of at most {max_images:,} "
                                  "images holds; refusing to read further")
            if op.name == "STOP":
                break
            reader.step(op.name, arg)
    except CifarPickleError:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # genops on a damaged stream (truncated, unknown opcode)
        raise reader.fail(f"not a readable pickle ({e})") from None
    if len(reader.stack) != 1 or reader.marks or type(reader.stack[0]) is not dict:
        raise reader.fail("the pickle does not end in one dict")
    return reader.stack[0]
