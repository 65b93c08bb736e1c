"""The resources grammar: ranges, memory sizes, GPU shorthands and their table form."""

import pytest
from pydantic import ValidationError

from dstack.core.models.common import format_memory, parse_memory
from dstack.core.models.resources import GPU, GPUSpec, Memory, Range, Resources, ResourcesSpec


@pytest.mark.parametrize(
    "text,expected",
    [("24GB", 24.0), ("512MB", 0.5), ("1TB", 1024.0), ("16gb", 16.0), (8, 8.0), ("0.5GB", 0.5), ("2", 2.0)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected
    assert Memory.parse(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "24XB", "-1GB", True, [1]])
def test_parse_memory_rejects(bad):
    with pytest.raises(ValueError):
        parse_memory(bad)


def test_format_memory():
    assert format_memory(24.0) == "24GB"
    assert format_memory(0.5) == "512MB"
    assert format_memory(2048.0) == "2TB"
    assert str(Memory.parse("1.5GB")) == "1.5GB"


@pytest.mark.parametrize(
    "value,lo,hi",
    [
        ("2", 2, 2),
        ("2..", 2, None),
        ("..8", None, 8),
        ("2..8", 2, 8),
        (4, 4, 4),
        ({"min": 1, "max": 3}, 1, 3),
        ("..", None, None),
    ],
)
def test_int_range(value, lo, hi):
    r = Range[int].model_validate(value)
    assert (r.min, r.max) == (lo, hi)


def test_memory_range():
    r = Range[Memory].model_validate("24GB..80GB")
    assert (r.min, r.max) == (24.0, 80.0)
    assert isinstance(r.min, Memory)
    assert str(r) == "24GB..80GB"
    assert str(Range[Memory].model_validate("8GB..")) == "8GB.."
    assert str(Range[Memory].model_validate("..512MB")) == "..512MB"
    assert str(Range[int].model_validate(3)) == "3"


@pytest.mark.parametrize("bad", ["8..2", "a..b", "1..2..3", "", True])
def test_range_rejects(bad):
    with pytest.raises(ValidationError):
        Range[int].model_validate(bad)


def test_range_helpers():
    r = Range[int].model_validate("2..8")
    assert r.contains(2) and r.contains(8) and not r.contains(9)
    assert Range[int].model_validate("2..").contains(10_000)
    assert r.intersect(Range[int].model_validate("5..")) == Range[int](min=5, max=8)
    assert r.intersect(Range[int].model_validate("9..")) is None


@pytest.mark.parametrize(
    "spec,names,count,memory",
    [
        ("24GB", None, (1, 1), (24, 24)),
        ("80GB", None, (1, 1), (80, 80)),
        ("A100:2", ["A100"], (2, 2), None),
        ("A100:80GB:2", ["A100"], (2, 2), (80, 80)),
        ("H100:8", ["H100"], (8, 8), None),
        ("2:A100", ["A100"], (2, 2), None),
        ("80GB:A100:2", ["A100"], (2, 2), (80, 80)),
        ("A100,H100", ["A100", "H100"], (1, 1), None),
        ("A100,H100:24GB..80GB:1..4", ["A100", "H100"], (1, 4), (24, 80)),
        ("24GB..:2..", None, (2, None), (24, None)),
        (2, None, (2, 2), None),
        ({"name": "A100", "count": "1..2", "memory": "40GB.."}, ["A100"], (1, 2), (40, None)),
        ({"name": ["A10G", "L4"]}, ["A10G", "L4"], (1, 1), None),
    ],
)
def test_gpu_grammar(spec, names, count, memory):
    gpu = GPUSpec.model_validate(spec)
    assert gpu.name == names
    assert (gpu.count.min, gpu.count.max) == count
    if memory is None:
        assert gpu.memory is None
    else:
        assert (gpu.memory.min, gpu.memory.max) == memory


@pytest.mark.parametrize("bad", ["A100:xx", "A100:2:3", "24GB:40GB", "A100::2", "", "8..2", "A100:?", True])
def test_gpu_grammar_rejects(bad):
    with pytest.raises(ValidationError):
        GPUSpec.model_validate(bad)


def test_gpu_error_names_the_spec():
    with pytest.raises(ValidationError) as e:
        GPUSpec.model_validate("A100:xx")
    assert "invalid GPU spec 'A100:xx'" in str(e.value)


def test_gpu_mapping_extra_fields():
    gpu = GPUSpec.model_validate({"vendor": "NVIDIA", "total_memory": "160GB..", "compute_capability": 8.0})
    assert gpu.vendor == "nvidia"
    assert gpu.total_memory.min == 160
    assert gpu.compute_capability == "8.0"
    with pytest.raises(ValidationError):
        GPUSpec.model_validate({"nmae": "A100"})


def test_gpu_pretty():
    assert GPUSpec.model_validate("A100:80GB:2").pretty_format() == "A100:80GB:2"
    assert str(GPUSpec.model_validate("H100:8")) == "H100:8"
    assert str(GPUSpec.model_validate("24GB..80GB:1..4")) == "24GB..80GB:1..4"


def test_python_constructors():
    assert GPU is GPUSpec and Resources is ResourcesSpec
    g = GPUSpec(name="A100", count=2)
    assert g.name == ["A100"] and g.count.min == g.count.max == 2
    r = ResourcesSpec(gpu=GPUSpec(memory="24GB"))
    assert r.gpu.memory.min == 24 and r.gpu.count.min == 1
    r = ResourcesSpec(cpu=4, memory="16GB..")
    assert (r.cpu.min, r.cpu.max) == (4, 4)
    assert (r.memory.min, r.memory.max) == (16, None)
    r = ResourcesSpec.model_validate({"gpu": "A100:80GB:2"})
    assert r.gpu.name == ["A100"] and r.gpu.memory.min == 80 and r.gpu.count.max == 2
    assert Resources(gpu="24GB").gpu.memory.min == 24


def test_resources_defaults_and_pretty():
    r = ResourcesSpec()
    assert (r.cpu.min, r.cpu.max) == (2, None)
    assert (r.memory.min, r.memory.max) == (8, None)
    assert (r.disk.min, r.disk.max) == (100, None)
    assert r.gpu is None and r.shm_size is None
    assert r.pretty_format() == "2..xCPU, 8GB.., 100GB.. (disk)"
    r = ResourcesSpec.model_validate({"gpu": "A100:80GB:2", "cpu": "4..8", "memory": "32GB", "disk": "200GB.."})
    assert str(r) == "4..8xCPU, 32GB, A100:80GB:2, 200GB.. (disk)"


def test_resources_other_forms():
    r = ResourcesSpec.model_validate({"disk": {"size": "50GB"}, "shm_size": "16GB", "gpu": 1})
    assert r.disk.min == 50 and r.shm_size == 16 and r.gpu.count.min == 1
    with pytest.raises(ValidationError):
        ResourcesSpec.model_validate({"gpus": 1})
    with pytest.raises(ValidationError):
        ResourcesSpec.model_validate({"cpu": "-1"})


def test_resources_round_trip():
    r = ResourcesSpec.model_validate({"gpu": "A100,H100:24GB..80GB:1..4", "memory": "64GB.."})
    assert ResourcesSpec.model_validate(r.model_dump()) == r
    assert ResourcesSpec.model_validate_json(r.model_dump_json()) == r
