"""Pickled files are read through allow-lists only: a file that names anything else is refused by name, unrun."""

import io
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from calmwild.interop.safe_pickle import (
    NUMPY_GLOBALS,
    PROTOCOL2_GLOBALS,
    UnsafeFileError,
    first_global,
    load_torch_file,
    restricted_load,
    torch_storage_from_bytes,
)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_torch_file_with_a_payload_is_refused_naming_the_global(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*evil\.ckpt: it needs posix\.system"):
        load_torch_file(path)
    assert not marker.exists()


def test_a_plain_torch_file_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "meta": {"n": 1, "names": ["a"]}}, path)
    loaded = load_torch_file(path)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["meta"] == {"n": 1, "names": ["a"]}


def test_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt is not a readable torch file"):
        load_torch_file(junk)


def test_a_plain_pickle_given_as_torch_file_names_what_it_would_call(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"net": Payload(marker)}))
    assert first_global(path) == "posix.system"
    with pytest.raises(UnsafeFileError, match=r"net\.pkl: it needs posix\.system"):
        load_torch_file(path)
    assert not marker.exists()


def test_the_restricted_unpickler_resolves_only_its_table(tmp_path):
    path = tmp_path / "data.pkl"
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path.write_bytes(pickle.dumps({"data": array, "x": np.float64(0.5), "order": OrderedDict(a=1)}, protocol=2))
    allowed = {**NUMPY_GLOBALS, **PROTOCOL2_GLOBALS, ("collections", "OrderedDict"): OrderedDict}
    loaded = restricted_load(path, allowed)
    assert np.array_equal(loaded["data"], array) and loaded["x"] == 0.5 and loaded["order"] == {"a": 1}
    with pytest.raises(UnsafeFileError, match=r"collections\.OrderedDict"):
        restricted_load(path, {**NUMPY_GLOBALS, **PROTOCOL2_GLOBALS})
    marker = tmp_path / "ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([array, Payload(marker)]))
    with pytest.raises(UnsafeFileError, match=r"evil\.pkl: it needs posix\.system"):
        restricted_load(tmp_path / "evil.pkl", allowed)
    assert not marker.exists()
    (tmp_path / "cut.pkl").write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut\.pkl is not a readable pickle"):
        restricted_load(tmp_path / "cut.pkl", allowed)


def test_tensor_storages_inside_plain_pickles_are_rebuilt_weights_only():
    tensor = torch.arange(6.0).reshape(2, 3)
    reducer, (data,) = tensor.storage().__reduce__()[:2]
    storage = torch_storage_from_bytes(data)
    assert storage.tolist() == tensor.flatten().tolist()
    buffer = io.BytesIO()
    torch.save(Payload("/tmp/never"), buffer)
    with pytest.raises(pickle.UnpicklingError):
        torch_storage_from_bytes(buffer.getvalue())
