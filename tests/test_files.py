"""The safe checkpoint reader (coup_fast._files): numpy scalars allowed under both numpy name
sets, code refused with the global named, damaged files reported as damaged."""
import io
import os
import pickle
import types
import zipfile

import numpy as np
import pytest
import torch

from coup_fast._files import load_state_dict_strict, load_weights_file

NUMPY1_SCALAR = b"cnumpy.core.multiarray\nscalar\n"   # protocol-2 GLOBAL opcodes, as they sit in the stream
NUMPY2_SCALAR = b"cnumpy._core.multiarray\nscalar\n"
_scalar = np.float64(0).__reduce__()[0]  # the function numpy pickles scalars through


class _Numpy1Pickler(pickle._Pickler):
    """The pure-Python pickler, writing numpy's scalar reconstructor under numpy 1's module name
    (``numpy.core.multiarray``), as files saved in 2021 have it; numpy 2 itself writes ``numpy._core``."""

    def save_global(self, obj, name=None):
        if obj is _scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


# torch.save takes any module-like object with Pickler and dump (dump: the legacy format's header).
NUMPY1_PICKLE_MODULE = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=_Numpy1Pickler, dump=pickle.dump)


def save_with_numpy1_names(obj, path, **kw):
    torch.save(obj, path, pickle_module=NUMPY1_PICKLE_MODULE, **kw)


def pickled_bytes(path) -> bytes:
    """The pickle stream of a torch file: data.pkl of the zip format, the whole file for the legacy one."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return open(path, "rb").read()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("names", ["numpy2", "numpy1"])
def test_numpy_scalars_load_under_both_numpy_name_sets(tmp_path, names, zip_format):
    obj = {"param_groups": [{"lr": 2e-4 * np.minimum(1234 / 5000, 1.0), "betas": (0.9, 0.999)}],
           "count": np.int64(7), "half": np.float32(0.5), "w": torch.arange(3.0)}
    path = tmp_path / "ck.pth"
    save = save_with_numpy1_names if names == "numpy1" else torch.save
    save(obj, path, _use_new_zipfile_serialization=zip_format)
    stream = pickled_bytes(path)
    # the file really carries the name set under test, and only it
    assert (NUMPY1_SCALAR in stream) == (names == "numpy1")
    assert (NUMPY2_SCALAR in stream) == (names == "numpy2")
    assert b"cnumpy\ndtype\n" in stream
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL numpy"):  # torch alone refuses it
        torch.load(path, weights_only=True)
    before = set(torch.serialization.get_safe_globals())
    loaded = load_weights_file(path)
    lr = loaded["param_groups"][0]["lr"]
    assert type(lr) is np.float64 and lr == 2e-4 * 1234 / 5000
    assert type(loaded["count"]) is np.int64 and loaded["count"] == 7
    assert type(loaded["half"]) is np.float32 and loaded["half"] == 0.5
    assert torch.equal(loaded["w"], torch.arange(3.0))
    # the allow-list was widened for this call only
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_numpy_dtype_objects_and_classes_load(tmp_path):
    path = tmp_path / "dt.pth"
    torch.save({"dtype": np.dtype("float64"), "cls": type(np.dtype("float32"))}, path)
    loaded = load_weights_file(path)
    assert loaded["dtype"] == np.dtype("float64")
    assert loaded["cls"] is type(np.dtype("float32"))


def test_numpy2_keeps_the_numpy1_module_as_an_alias():
    # numpy 2 resolves numpy-1 pickles' name to this very function, so mapping the name onto it is faithful
    import numpy.core.multiarray as numpy1_module
    assert numpy1_module.scalar is _scalar
    assert pickle.loads(pickle.dumps(np.float64(0.25), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray")) == 0.25


class _Payload:
    """What a malicious checkpoint pickles: unpickling calls func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload, refused_global", [
    (lambda marker: _Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
    (lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w')"), "eval"),
])
def test_code_in_a_checkpoint_is_refused_and_named(tmp_path, payload, refused_global):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": payload(marker)}, path)
    with pytest.raises(ValueError) as err:
        load_weights_file(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message
    assert f"GLOBAL {refused_global}" in message  # torch's line, surfaced
    assert not marker.exists()


@pytest.mark.parametrize("value, refused_global", [
    (np.array([1.0, 2.0]), "numpy._core.multiarray._reconstruct"),  # arrays: not on the list
    (np.dtype(object), None),  # an object dtype is built, but its type is not allowed
    (np.float64, "numpy.float64"),
])
def test_numpy_beyond_scalars_and_numeric_dtypes_is_refused(tmp_path, value, refused_global):
    path = tmp_path / "np.pth"
    torch.save({"x": value}, path)
    with pytest.raises(ValueError, match="refused") as err:
        load_weights_file(path)
    if refused_global:
        assert refused_global in str(err.value)


def _zip_checkpoint_bytes():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4096)}, buf)
    return buf.getvalue()


def _legacy_checkpoint_bytes():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4096)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("content, expected", [
    (lambda: bytes(range(256)) * 4, "not a torch checkpoint"),
    (lambda: b"a text file, not weights\n", "not a torch checkpoint"),
    (lambda: b"", "empty file"),
    (lambda: _zip_checkpoint_bytes()[:5000], "corrupt or truncated"),
    (lambda: _zip_checkpoint_bytes()[:-40], "corrupt or truncated"),
    (lambda: _legacy_checkpoint_bytes()[:3000], "corrupt or truncated"),
    (lambda: b"\x80\x02" + bytes(range(200, 256)) * 3, "corrupt or truncated"),
])
def test_garbage_is_reported_as_damaged_not_as_unsafe(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    path.write_bytes(content())
    with pytest.raises(ValueError, match=expected) as err:
        load_weights_file(path)
    assert str(path) in str(err.value)
    assert "refused" not in str(err.value) and "pickles" not in str(err.value)


def test_safetensors_by_content_and_a_truncated_one(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b.c": torch.arange(5)}
    path = tmp_path / "w.bin"  # the name says nothing: the content decides
    save_file(tensors, str(path))
    loaded = load_weights_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        load_weights_file(truncated)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_weights_file(tmp_path / "nope.pth")


def test_strict_assignment_names_what_differs():
    def fresh():
        with torch.device("meta"):
            return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    good = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2), "1.weight": torch.ones(2),
            "1.bias": torch.zeros(2), "1.running_mean": torch.zeros(2), "1.running_var": torch.ones(2),
            "1.num_batches_tracked": torch.tensor(3)}
    model = load_state_dict_strict(fresh(), {**good, "0.weight": torch.ones(2, 3, dtype=torch.float64)}, "f", "net")
    assert model[0].weight.dtype == torch.float32 and model[1].num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match=r"f: not a net state dict: 1 missing keys \(first: \['0.bias'\]\)"):
        load_state_dict_strict(fresh(), {k: v for k, v in good.items() if k != "0.bias"}, "f", "net")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(first: \['extra'\]\)"):
        load_state_dict_strict(fresh(), {**good, "extra": torch.ones(1)}, "f", "net")
    with pytest.raises(ValueError, match=r"shape mismatch for net: 0.weight is \(3, 2\) in the file, \(2, 3\)"):
        load_state_dict_strict(fresh(), {**good, "0.weight": torch.ones(3, 2)}, "f", "net")
    with pytest.raises(ValueError, match=r"'0.bias' holds a list, not a tensor"):
        load_state_dict_strict(fresh(), {**good, "0.bias": [0.0, 0.0]}, "f", "net")
