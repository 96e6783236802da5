"""Small files that would cost gigabytes, and weights of the wrong kind (issue 26).

Each bomb is loaded in a child process under a 1 GiB address-space cap (RLIMIT_AS) with a generous
timeout: the bound is the cap, not a timing.  Without the checks the child dies of a MemoryError
(or runs out its time) instead of printing the loader's ValueError.  The bombs are built here, in
the files' real formats: a CIFAR batch pickle, a torch zip, a YAML settings file, tar archives.
"""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
import zlib

import numpy as np
import pytest
import torch

from coup_fast._cifar_pickle import CifarPickleError, read_cifar_pickle
from coup_fast._files import (check_weight, load_state_dict_strict, load_weights_file, safetensors_header,
                              strip_module_prefix)
from coup_fast.cli import ConfigError, read_config_file
from coup_fast.data import load_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 1 << 30


def run_capped(code: str, timeout: float = 120) -> str:
    """Run `code` in a fresh interpreter under a 1 GiB address-space cap; its stdout.  The code
    prints "REFUSED: <message>" when the load raises a ValueError."""
    prologue = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))
        def refused(load):
            try:
                load()
            except ValueError as e:
                print("REFUSED:", e)
                sys.exit(0)
            except MemoryError:
                print("MEMORY ERROR")
                sys.exit(3)
            print("LOADED")
            sys.exit(4)
        """)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the load ran past {timeout} s under the {CAP >> 20} MiB cap")
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc.stdout


def _tar_gz(path, members: dict) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path)


# ----------------------------------------------------------------------------- 1. CIFAR pickle memo bomb
def memo_bomb(levels: int = 7, width: int = 16) -> bytes:
    """A protocol-2 CIFAR-looking dict whose b'data' is a list of `width` references to one list of
    `width` references to ... (`levels` deep): a few hundred bytes naming width**levels ints."""
    out = [b"\x80\x02}q\x00(U\x0bbatch_labelU\x14testing batch 1 of 1U\x06labels]q\x01U\x04data"]
    out.append(b"]q\x02(" + b"K\x00" * width + b"e")  # memo 2: [0] * width
    for level in range(1, levels):  # POP the previous list (it stays in the memo), then [previous] * width
        out.append(b"0]q%c(" % (level + 2) + b"h%c" % (level + 1) * width + b"e")
    out.append(b"u.")
    return b"".join(out)


def test_the_memo_bomb_is_a_real_pickle_of_that_many_elements():
    # the standard unpickler reads it as the shared structure it claims (checked at small size)
    d = pickle.loads(memo_bomb(levels=3, width=4), encoding="bytes")
    assert np.asarray(d[b"data"]).shape == (4, 4, 4) and d[b"data"][0] is d[b"data"][1]
    assert len(memo_bomb()) < 400


def test_cifar_memo_bomb_is_refused_under_a_memory_cap(tmp_path):
    path = _tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": memo_bomb()})
    out = run_capped(f"""
        from coup_fast.data import load_cifar
        refused(lambda: load_cifar({path!r}, n=None))
        """)
    assert "REFUSED:" in out and "referred to a second time (memo entry 2)" in out, out


def _py2_batch_stream(data: np.ndarray, labels: list, filenames: list) -> bytes:
    """A batch as Python 2's cPickle.dump(d, f, 2) writes the real files: SHORT_BINSTRING keys,
    BINPUT after each object, numpy.core.multiarray._reconstruct, dtype('u1', 0, 1), the pixels as
    one BINSTRING, labels in APPENDS of 1000."""
    memo = iter(range(1, 10 ** 6))

    def put():
        return b"q" + bytes([next(memo) % 256])

    def s(b):
        return b"U" + bytes([len(b)]) + b + put()

    def ints(values):
        chunks = [values[i:i + 1000] for i in range(0, len(values), 1000)]
        return b"".join(b"(" + b"".join(b"K" + bytes([v]) for v in chunk) + b"e" for chunk in chunks)

    n = data.shape[0]
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + put() + b"cnumpy\nndarray\n" + put()
             + b"K\x00\x85" + s(b"b") + b"\x87R" + put()
             + b"(K\x01" + b"M" + struct.pack("<H", n) + b"M\x00\x0c\x86"
             + b"cnumpy\ndtype\n" + put() + s(b"u1") + b"K\x00K\x01\x87R" + put()
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89T" + struct.pack("<i", data.size) + data.tobytes() + b"tb")
    names = b"]" + put() + b"(" + b"".join(s(f) for f in filenames) + b"e"
    return (b"\x80\x02}q\x00(" + s(b"data") + array + s(b"labels") + b"]" + put() + ints(labels)
            + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"filenames") + names + b"u.")


def test_a_batch_in_python2s_layout_loads(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (1500, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 1500).tolist()
    stream = _py2_batch_stream(data, labels, [b"img_%04d.png" % i for i in range(1500)])
    reference = pickle.loads(stream, encoding="bytes")  # the standard unpickler: the stream is what it says
    assert np.array_equal(reference[b"data"], data) and reference[b"labels"] == labels
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(stream)
    x, y = load_cifar(str(tmp_path), n=None)
    assert y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255))


def _dumps(d) -> bytes:
    return pickle.dumps(d, protocol=2)


@pytest.mark.parametrize("stream, message", [
    (_dumps({b"data": [[1, 2], [3]], b"labels": []}), "a list holding a list"),
    (_dumps({b"data": {b"a": 1}, b"labels": []}), "the value of b'data' is a dict"),
    (_dumps({b"data": (1, 2), b"labels": []}), "is a tuple"),
    (_dumps({1: b"x"}), "a dict key that is a int"),
    (_dumps({b"data": {1, 2}}), "refusing to load global __builtin__.set"),
    (_dumps({b"data": np.zeros((2, 3), np.float32)}), "only uint8 arrays"),
    (_dumps({b"data": np.zeros(2, object)}), "only number types"),
    (_dumps([1, 2]), "does not end in one dict"),
    (_dumps({b"labels": list(range(5000))}), "more than 4,256 opcodes"),
    (_dumps({b"data": np.zeros((6, 3072), np.uint8)}), "an array of 18,432 pixels"),
    (_dumps({b"x": 1})[:-3], "not a readable pickle"),
])
def test_the_reader_builds_only_what_cifar_files_hold(stream, message):
    with pytest.raises(CifarPickleError, match=message):
        read_cifar_pickle(stream, max_images=5)  # 32 * 5 + 4096 opcodes, 5 * 3072 pixels


def test_numpy_integer_labels_and_python3_pickles_still_load():
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    for protocol in (2, 3, 4):
        d = read_cifar_pickle(pickle.dumps({b"data": data, b"labels": list(np.array([3, 7])), b"filenames": [b"a", b""],
                                            "str key": "text", b"none": None}, protocol=protocol), 10)
        assert np.array_equal(d[b"data"], data) and d[b"labels"] == [3, 7] and type(d[b"labels"][0]) is int
        assert d[b"filenames"] == [b"a", b""] and d["str key"] == "text" and d[b"none"] is None


def test_float_labels_are_refused_not_truncated(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(_dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1.0, 2.7, 3.0]}))
    with pytest.raises(ValueError, match=r"b'labels'\[0\] is 1.0: expected labels in \[0, 10\), as integers"):
        load_cifar(str(tmp_path), n=None)


def test_every_missing_cifar_file_is_named_in_one_message(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_4"):
        (folder / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load_cifar(str(tmp_path), split="train")
    message = str(err.value)
    assert "['data_batch_3', 'data_batch_5']" in message
    assert not any(present in message for present in ("data_batch_1", "data_batch_2", "data_batch_4"))


# ----------------------------------------------------------------------------- 2. checkpoint zip bomb
def _deflated_zeros(size: int) -> bytes:
    """Raw DEFLATE of `size` zero bytes, built from one fully flushed 1 MiB block repeated."""
    block = 1 << 20
    assert size % block == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    return chunk * (size // block) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def _zip(records: list) -> bytes:
    """A zip of (name, stored bytes, compress method, declared size, crc32) records."""
    out, directory = io.BytesIO(), []
    for name, data, method, size, crc in records:
        offset = out.tell()
        out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(name), 0))
        out.write(name.encode() + data)
        directory.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), size,
                                     len(name), 0, 0, 0, 0, 0, offset) + name.encode())
    start = out.tell()
    out.write(b"".join(directory))
    out.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(records), len(records), out.tell() - start, start, 0))
    return out.getvalue()


def _torch_records(obj) -> list:
    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(buf)
    return [(r.filename, z.read(r), zipfile.ZIP_STORED, r.file_size, r.CRC) for r in z.infolist()]


def test_our_zip_writer_makes_files_torch_reads(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(_zip(_torch_records({"w": torch.arange(5.0)})))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))


def test_deflated_storage_bomb_is_refused_under_a_memory_cap(tmp_path):
    size = 1 << 30
    crc, mib = 0, bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    records = [(n, _deflated_zeros(size), zipfile.ZIP_DEFLATED, size, crc) if n.endswith("/data/0") else (n, *rest)
               for n, *rest in _torch_records({"w": torch.zeros(4)})]
    path = tmp_path / "bomb.pt"
    path.write_bytes(_zip(records))
    assert path.stat().st_size < 1_200_000
    out = run_capped(f"""
        from coup_fast._files import load_weights_file
        refused(lambda: load_weights_file({str(path)!r}))
        """)
    assert "REFUSED:" in out and "the record 'archive/data/0' declares 1,073,741,824 bytes" in out, out


def test_records_that_add_up_to_a_bomb_are_refused(tmp_path):
    mib = 1 << 20
    records = _torch_records({"w": torch.zeros(4)})
    records += [(f"archive/extra/{i}", _deflated_zeros(mib), zipfile.ZIP_DEFLATED, mib, zlib.crc32(bytes(mib)))
                for i in range(100)]  # each passes the ratio bound (its 1 MiB slack), together they do not
    path = tmp_path / "many.pt"
    path.write_bytes(_zip(records))
    with pytest.raises(ValueError, match=r"its records declare .* bytes by 'archive/extra/\d+', more than 20 times"):
        load_weights_file(path)


def test_a_zip_directory_out_of_place_is_refused(tmp_path):
    # zipfile would read the directory at (end record - its size), torch's miniz at the offset the
    # record states: bytes between them let the two see different directories
    data = _zip(_torch_records({"w": torch.zeros(4)}))
    end = data.rindex(b"PK\x05\x06")
    path = tmp_path / "gap.pt"
    path.write_bytes(data[:end] + bytes(64) + data[end:])
    with pytest.raises(ValueError, match="its zip directory is stated at bytes"):
        load_weights_file(path)


def test_a_legacy_storage_larger_than_the_file_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(5)}, buf, _use_new_zipfile_serialization=False)
    blob = buf.getvalue()
    at = blob.index(b"X\x03\x00\x00\x00cpu") + 8 + 2  # the pid's location, its memo put, then numel
    assert blob[at:at + 2] == b"K\x05"
    path = tmp_path / "legacy.pt"
    path.write_bytes(blob[:at] + b"J" + struct.pack("<i", 2 ** 31 - 1) + blob[at + 2:])  # 8 GiB of floats
    with pytest.raises(ValueError, match=r"storages declare 8,589,934,588 bytes by the storage '\d+' "
                                         r"\(2,147,483,647 elements of 4 bytes\)"):
        load_weights_file(path)


# ----------------------------------------------------------------------------- 3. YAML alias bomb
# "Billion laughs", all inside a known setting: the last item names 9**9 strings
BILLION_LAUGHS = """\
defenses:
  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  - &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  - &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  - &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  - &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  - &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  - [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_alias_bomb_is_refused_under_a_memory_cap(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(BILLION_LAUGHS)
    out = run_capped(f"""
        from coup_fast.cli import build_parser, config_from_args, validate
        refused(lambda: validate(config_from_args(build_parser().parse_args(["eval", "--config", {str(path)!r}]))))
        """)
    assert "REFUSED: --config:" in out and "found the alias *a: aliases are not accepted" in out, out
    assert len(out) < 2000


def test_config_files_are_bounded_and_keys_checked(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("n_images = 8\n# " + "x" * (1 << 20) + "\n")  # valid TOML, but no settings file is this long
    with pytest.raises(ConfigError, match="larger than 1,048,576 bytes"):
        read_config_file(str(big))
    numbered = tmp_path / "keys.yaml"
    numbered.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="the key '1' is a int, not a setting's name"):
        read_config_file(str(numbered))
    outside = tmp_path / "mixed.toml"
    outside.write_text("seed = 3\n[eval]\nn_images = 8\n")  # seed would be silently ignored
    with pytest.raises(ConfigError, match=r"an \[eval\] table and settings outside it \(\['seed'\]\)"):
        read_config_file(str(outside))
    inside = tmp_path / "eval.toml"
    inside.write_text("[eval]\nn_images = 8\n")
    assert read_config_file(str(inside)) == {"n_images": 8}


# ----------------------------------------------------------------------------- 4. tar archives
def test_member_count_bomb_stops_at_the_bound_under_a_memory_cap(tmp_path):
    import lzma

    headers = tarfile.TarInfo("junk").tobuf() * 30_000  # 30,000 empty members
    path = tmp_path / "many.tar.xz"
    path.write_bytes(lzma.compress(headers + bytes(1024), preset=0))
    out = run_capped(f"""
        from coup_fast.data import load_cifar
        refused(lambda: load_cifar({str(path)!r}, n=None))
        """)
    assert ("REFUSED:" in out and "stopped after 1,000 member headers without finding "
            "['cifar-10-batches-py/test_batch']" in out), out


def test_a_long_name_header_bomb_is_refused_under_a_memory_cap(tmp_path):
    size = 600 << 20
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, size
    # a gzip member whose DEFLATE holds the header, then 600 MiB of zeros (the "name"); tarfile reads
    # such a name whole into memory before it returns the member
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(info.tobuf(format=tarfile.GNU_FORMAT)) + deflate.flush(zlib.Z_FULL_FLUSH)
    path = tmp_path / "longname.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + _deflated_zeros(size))
    assert path.stat().st_size < 700_000
    out = run_capped(f"""
        from coup_fast.data import load_cifar
        refused(lambda: load_cifar({str(path)!r}, n=None))
        """)
    assert "REFUSED:" in out and "a 629,145,600-byte extended header (at most 65,536)" in out, out


# ----------------------------------------------------------------------------- 10. loaders
def _fresh():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


GOOD = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2), "1.weight": torch.ones(2), "1.bias": torch.zeros(2),
        "1.running_mean": torch.zeros(2), "1.running_var": torch.ones(2), "1.num_batches_tracked": torch.tensor(3)}


@pytest.mark.parametrize("key, value, message", [
    ("0.weight", torch.ones(2, 3, dtype=torch.complex64), "holds torch.complex64 values; the network expects real"),
    ("0.weight", torch.ones(2, 3).to_sparse(), "is a torch.sparse_coo tensor; a weight must be a dense one"),
    ("0.weight", torch.ones(2, 3, dtype=torch.int64), "holds torch.int64 values; the network expects real"),
    ("0.bias", torch.zeros(2, dtype=torch.bool), "holds torch.bool values; the network expects real"),
    ("1.num_batches_tracked", torch.tensor(3.0), "holds torch.float32 values; the network expects integer"),
    ("0.weight", torch.empty(2, 3, device="meta"), "is a meta tensor"),
    ("0.weight", torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), "holds 1 NaN or infinite values"),
    ("0.bias", torch.tensor([1e300, 0.0], dtype=torch.float64), r"holds 1 NaN or infinite values \(as torch.float32\)"),
    ("1.running_var", torch.tensor([1.0, -0.5]), "holds 1 negative variances"),
    ("0.weight", torch.zeros(1).expand(2, 3), "6 elements over 4 bytes of storage"),
])
def test_weights_of_the_wrong_kind_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=f"^ckpt.pt: {key}:? {message}"):
        load_state_dict_strict(_fresh(), {**GOOD, key: value}, "ckpt.pt", "net")


def test_good_weights_still_load_cast_to_the_models_dtypes():
    model = load_state_dict_strict(_fresh(), {**GOOD, "0.weight": torch.ones(2, 3, dtype=torch.bfloat16),
                                              "1.num_batches_tracked": torch.tensor(3, dtype=torch.int32)}, "f", "net")
    assert model[0].weight.dtype == torch.float32 and model[1].num_batches_tracked.dtype == torch.int64


def test_keys_that_are_not_names_or_are_there_twice_are_refused():
    with pytest.raises(ValueError, match="ckpt.pt: not a state dict: the key 0 is a int"):
        strip_module_prefix({0: torch.ones(1)}, "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: not a state dict: the key 0 is a int"):
        load_state_dict_strict(_fresh(), {**GOOD, 0: torch.ones(1)}, "ckpt.pt", "net")
    with pytest.raises(ValueError, match="both 'module.0.bias' and '0.bias' name the tensor '0.bias'"):
        strip_module_prefix({"module.0.bias": torch.ones(2), "0.bias": torch.zeros(2)}, "ckpt.pt")
    assert list(strip_module_prefix({"module.a": 1, "b": 2})) == ["a", "b"]


def test_loaders_refuse_both_prefixed_and_bare_keys(tmp_path):
    from coup_fast.models import load_wideresnet
    from coup_fast.models.wideresnet import WideResNet

    sd = WideResNet(10, 1, 10).state_dict()
    path = tmp_path / "wrn.pt"
    torch.save({**sd, "module.fc.weight": torch.zeros_like(sd["fc.weight"])}, path)
    with pytest.raises(ValueError, match=f"{path}: both 'fc.weight' and 'module.fc.weight'"):
        load_wideresnet(path, depth=10, widen=1)
    torch.save({**sd, "fc.weight": torch.full_like(sd["fc.weight"], float("inf"))}, path)
    with pytest.raises(ValueError, match=f"{path}: fc.weight holds {sd['fc.weight'].numel():,} NaN or infinite"):
        load_wideresnet(path, depth=10, widen=1)


def test_ncsnpp_ema_shadow_params_are_checked(tmp_path):
    from coup_fast.models.ncsnpp import NCSNpp, load_ncsnpp, ncsnpp_small

    net = NCSNpp(ncsnpp_small())
    shadow = [p.detach().clone() for p in net.parameters()]
    shadow[3].view(-1)[0] = float("nan")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": net.state_dict(), "ema": {"shadow_params": shadow}}, path)
    name = list(dict(net.named_parameters()))[3]
    with pytest.raises(ValueError, match=rf"ema.shadow_params\[3\] \(for {name}\) holds 1 NaN"):
        load_ncsnpp(path, config=ncsnpp_small())


def _safetensors_bytes(header: str, data: bytes) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_a_safetensors_header_naming_a_tensor_twice_is_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    # the library keeps the last "w" (2 floats, which tile the data exactly) and loads silently
    path.write_bytes(_safetensors_bytes('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                        '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)))
    with pytest.raises(ValueError, match=f"{path}: the safetensors header names 'w' twice"):
        load_weights_file(path)
    path.write_bytes(_safetensors_bytes('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)))
    assert safetensors_header(path)["w"]["shape"] == [2] and torch.equal(load_weights_file(path)["w"], torch.zeros(2))
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="corrupt or truncated safetensors file"):
        safetensors_header(path)


@pytest.fixture
def digits_weights(tmp_path):
    import shutil

    from coup_fast.models.digits import CLASSIFIER_FILE, META_FILE, SCORE_FILE, WEIGHTS_DIR

    for name in (SCORE_FILE, CLASSIFIER_FILE, META_FILE):
        shutil.copy(os.path.join(WEIGHTS_DIR, name), tmp_path / name)
    return tmp_path


def test_digits_loader_refuses_non_finite_weights(digits_weights):
    from safetensors.torch import load_file, save_file

    from coup_fast.models.digits import CLASSIFIER_FILE, load_digits_models

    path = str(digits_weights / CLASSIFIER_FILE)
    tensors = load_file(path)
    tensors["head.3.bias"][4] = float("nan")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=f"{path}: head.3.bias holds 1 NaN or infinite values"):
        load_digits_models(weights_dir=str(digits_weights))


def test_check_weight_names_the_key_it_is_given():
    with pytest.raises(ValueError, match=r"^f: ema\[0\] holds torch.int32 values"):
        check_weight("f", "ema[0]", torch.ones(2, dtype=torch.int32), torch.ones(2))


# ----------------------------------------------------------------------------- 11. training
def test_train_only_with_a_bad_digits_json_is_a_clear_error(digits_weights, capsys):
    from coup_fast.models.digits import META_FILE
    from coup_fast.train import main

    (digits_weights / META_FILE).write_text(json.dumps({"dataset": "digits"}))  # no training or metrics sections
    with pytest.raises(SystemExit) as e:
        main(["digits", "--out", str(digits_weights), "--only", "classifier", "--clf-steps", "1", "--threads", "1"])
    assert e.value.code == 2
    assert f"{digits_weights / META_FILE}: --only classifier keeps the score model" in capsys.readouterr().err


def test_a_forged_training_checkpoint_is_a_clear_error(tmp_path, capsys):
    from coup_fast.train import CHECKPOINT_DIR, CLF_AUG, main

    path = tmp_path / CHECKPOINT_DIR / "classifier.pt"
    path.parent.mkdir()
    config = {"model": "classifier", "steps": 2, "batch": 128, "lr": 2e-3, "weight_decay": 1e-3, **CLF_AUG, "seed": 0}
    # this run's config, with fields of the wrong kind: a generator state of 3 bytes, no optimizer
    torch.save({"config": config, "step": 1, "losses": [0.5], "generator": torch.zeros(3, dtype=torch.uint8),
                "opt": {}, "sched": {}, "clf": {}}, path)
    with pytest.raises(SystemExit) as e:
        main(["digits", "--out", str(tmp_path), "--steps", "2", "--clf-steps", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}: unreadable training checkpoint" in err and "--restart" in err


@pytest.mark.parametrize("only, kept, section", [("classifier", "digits_score.safetensors", "score"),
                                                 ("score", "digits_classifier.safetensors", "classifier")])
def test_train_only_still_keeps_the_other_model(digits_weights, only, kept, section):
    from safetensors.torch import load_file

    from coup_fast.train import train_digits

    weights = load_file(str(digits_weights / kept))
    record = json.loads((digits_weights / "digits.json").read_text())["training"][section]
    meta = train_digits(str(digits_weights), steps=2, clf_steps=2, only=only, progress=False)
    after = load_file(str(digits_weights / kept))
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert meta["training"][section] == record
