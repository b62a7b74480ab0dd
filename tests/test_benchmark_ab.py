"""benchmarks/ab.py's check path (what it runs before it times anything): an earlier revision's
kernel module loads beside the working tree's and both are checked against the reference and
against each other. Under TRITON_INTERPRET=1 (CI) or on CUDA."""

import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import ab
from tests.conftest import TRITON_DEVICE

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parent.parent


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def _checkout():
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout: ab.py compares against git revisions")


def _unchanged(path: str) -> bool:
    return _git("diff", "--quiet", "HEAD", "--", path).returncode == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_revision_loads_beside_the_tree_and_is_checked(dtype, capsys):
    versions = {"A HEAD": ab.load_revision("HEAD", "scan"), "B tree": ab.current("scan")}
    assert versions["A HEAD"] is not versions["B tree"]
    assert versions["A HEAD"].__name__.startswith("kernels.scan._ab_")
    ab.scan_case(versions, (2, 37, 20), dtype, TRITON_DEVICE, repeats=1, check=True)
    out = capsys.readouterr().out
    errs = [float(line.split("rel err h ")[1].split(",")[0]) for line in out.splitlines() if "rel err h" in line]
    assert len(errs) == 2 and max(errs) < (1e-6 if dtype == torch.float32 else 1e-2), out
    if _unchanged("kernels/scan/kernel.py"):  # the same source: the same bits
        assert "A and B bit-equal" in out, out


def test_memory_revision_loads_beside_the_tree_and_is_checked(capsys):
    versions = {"A HEAD": ab.load_revision("HEAD", "memory"), "B tree": ab.current("memory")}
    spec = ab.kernels.MemorySpec(heads=2, dim=16, block=2, ratio=2, slots=(40, 24, 8))
    inputs = ab.memory_inputs(2, 4, 45, spec, torch.float32, TRITON_DEVICE)
    ab.memory_case(versions, inputs, 4, torch.float32, "split", repeats=1, check=True)
    out = capsys.readouterr().out
    errs = [float(line.split("out ")[1].split(",")[0]) for line in out.splitlines() if "rel err" in line]
    assert len(errs) == 2 and max(errs) < 1e-5, out
    if _unchanged("kernels/memory/kernel.py"):
        assert "A and B bit-equal" in out, out


def test_memory_layouts_parse_or_exit_with_one_line():
    assert ab.parse_slots("240,240,460") == (240, 240, 460)
    assert ab.parse_slots("960") == (960,)
    for bad in ("", "240,,460", "0,8", "a"):
        with pytest.raises(SystemExit, match=r"--slots .*expected ring sizes >= 1"):
            ab.parse_slots(bad)


def test_an_unknown_revision_is_one_line():
    with pytest.raises(SystemExit, match=r"cannot read kernels/scan/kernel.py at 'no-such-rev'"):
        ab.load_revision("no-such-rev", "scan")


def test_a_missing_kernel_file_is_one_line():
    with pytest.raises(SystemExit, match=r"no kernel file 'no/such/kernel.py'"):
        ab.load_revision("no/such/kernel.py", "memory")
