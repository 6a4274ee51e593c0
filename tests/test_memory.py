"""Tests of core.memory's heap retention (freed tensor memory kept while a loop runs)."""

from __future__ import annotations

import sys

import pytest
from _tiny import tiny_ct_case

from napari_apl.core import memory


class _FakeLibc:
    """Records the glibc calls ``retained_heap`` makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setattr(memory, "_retained", 0)
    return libc


def test_retention_is_set_once_for_nested_blocks_and_given_back_after_the_last(fake_libc):
    keep = [
        ("mallopt", memory._M_MMAP_THRESHOLD, 32 << 20),
        ("mallopt", memory._M_TRIM_THRESHOLD, memory.HEAP_TRIM_WHILE_RETAINED),
    ]
    with memory.retained_heap() as on:
        assert on is True
        assert fake_libc.calls == keep
        with memory.retained_heap():
            assert fake_libc.calls == keep  # a second block (another refinement) changes nothing
        assert fake_libc.calls == keep  # ... nor does its end while the first runs
    assert fake_libc.calls == [*keep, ("mallopt", memory._M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]
    assert memory._retained == 0


def test_retention_is_given_back_after_an_error(fake_libc):
    with pytest.raises(RuntimeError), memory.retained_heap():
        raise RuntimeError("boom")
    assert fake_libc.calls[-1] == ("malloc_trim", 0) and memory._retained == 0


def test_switched_off_or_without_glibc_it_changes_nothing(fake_libc, monkeypatch):
    monkeypatch.setattr(memory, "RETAIN_HEAP", False)
    with memory.retained_heap() as on:
        assert on is False
    monkeypatch.setattr(memory, "RETAIN_HEAP", True)
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    with memory.retained_heap() as on:
        assert on is False
    assert fake_libc.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only here")
def test_the_real_c_library_takes_the_settings():
    if memory._glibc() is None:
        pytest.skip("not glibc")
    import torch

    with memory.retained_heap() as on:
        assert on is True
        for _ in range(3):  # tensors under and over the 32 MB threshold come and go
            small, large = torch.ones(4 << 20), torch.ones(16 << 20)
            assert float(small[-1] + large[-1]) == 2.0
            del small, large
    assert memory._retained == 0


def test_a_refinement_keeps_freed_memory_while_it_runs(fake_libc):
    """The refinement loop runs inside one retention block, given back when the generator ends."""
    from napari_apl.core.refine import RefineConfig, refine

    model, meta, vol = tiny_ct_case(base=4)
    gen = refine(model, meta, vol, RefineConfig(iterations=2, batch_size=2))
    next(gen)
    assert memory._retained == 1 and len(fake_libc.calls) == 2
    for _ in gen:
        pass
    assert memory._retained == 0 and fake_libc.calls[-1] == ("malloc_trim", 0)
    gen = refine(model, meta, vol, RefineConfig(iterations=5, batch_size=2))
    next(gen)
    gen.close()  # a refinement closed early (a cancelled run) gives it back too
    assert memory._retained == 0 and fake_libc.calls[-1] == ("malloc_trim", 0)
