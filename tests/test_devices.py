"""The small device helpers: dtype names and device synchronisation."""

import pytest
import torch

from quickdraft.devices import dtype_name, synchronize
from quickdraft.models import loading


def test_dtype_name_is_the_flag_spelling():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["float32", "bfloat16",
                                                                                      "float16"]
    assert dtype_name("bfloat16") == "bfloat16"
    assert all(loading.DTYPES[dtype_name(dtype)] == dtype for dtype in set(loading.DTYPES.values()))


def test_synchronize_is_a_no_op_off_cuda():
    synchronize(None)
    synchronize("cpu")
    synchronize(torch.device("cpu"))


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, "bfloat16"), (torch.float64, "auto"),
                                             ("float16", "float16")])
def test_a_draft_model_loads_on_the_targets_device_in_its_dtype(monkeypatch, dtype, expected):
    calls = []
    monkeypatch.setattr(loading, "load_model", lambda model, dtype, device: calls.append((model, dtype, device)))
    loading.load_draft_model("draft.gguf", dtype, torch.device("cpu"))
    assert calls == [("draft.gguf", expected, "cpu")]
