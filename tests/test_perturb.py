"""The seeded perturbation: Philox4x32-10 known answers, Triton-compatible normals, sharding-independence, update."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_memopt.core import perturb as P


@pytest.mark.parametrize(
    "ctr,key,expected",
    [  # Random123 kat_vectors, philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    t = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = P.philox4x32(t[0], key[0], key[1], words=t[1:])
    assert tuple(int(o) for o in out) == expected


def test_normal_statistics_and_offsets():
    k = P.key(123, 4)
    z = P.normal(k, 0, 200_003)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert float(z.abs().max()) < 6.0
    # any shard [start, start+n) sees exactly the full tensor's numbers
    for start, n in [(1, 10), (3, 4097), (4, 8), (199_999, 4)]:
        assert torch.equal(P.normal(k, start, n), z[start : start + n])
    # different keys (seed or parameter index) give unrelated streams
    other = P.normal(P.key(124, 4), 0, 1000)
    assert abs(float((other * z[:1000]).mean())) < 0.15
    assert not torch.equal(P.normal(P.key(123, 5), 0, 100), z[:100])


def test_normal_many_matches_normal():
    keys, numels = [P.key(9, i) for i in range(4)], [7, 4096, 1, 33]
    for z, k, n in zip(P.normal_many(keys, numels), keys, numels):
        assert torch.equal(z, P.normal(k, 0, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturbed_is_out_of_place(dtype):
    w = torch.randn(33, 17).to(dtype)
    before = w.clone()
    out = P.perturbed(w, P.key(1, 0), 1e-2)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(w, before)  # the weight itself is never written
    z = P.normal(P.key(1, 0), 0, w.numel()).view(w.shape)
    assert torch.equal(out, (w.float() + 1e-2 * z).to(dtype))


def test_update_matches_formula_and_cache():
    t = torch.randn(1001)
    seeds = torch.tensor([5, 2**32 - 1])
    a, b = torch.tensor([0.5, -0.3]), torch.tensor([0.2, 0.7])
    zs = [P.normal(P.key(int(s), 3), 0, t.numel()) for s in seeds]
    for adam in (None, 1e-8):
        m = a[0] * zs[0] + a[1] * zs[1]
        v = b[0] * zs[0] ** 2 + b[1] * zs[1] ** 2
        delta = m if adam is None else m / (v.sqrt() + adam)
        expected = t * 0.99 - 0.01 * delta
        t1, t2 = t.clone(), t.clone()
        P.update_(t1, 3, seeds, a, b if adam else None, 0.01, 0.99, 0, adam)
        P.update_(t2, 3, seeds, a, b if adam else None, 0.01, 0.99, 0, adam, zs=zs)
        assert torch.equal(t1, t2)
        torch.testing.assert_close(t1, expected, rtol=1e-6, atol=1e-6)
    # a shard starting at an offset updates exactly its part of the full tensor
    full, shard = t.clone(), t[100:600].clone()
    P.update_(full, 3, seeds, a, None, 0.01, 0.99)
    P.update_(shard, 3, seeds, a, None, 0.01, 0.99, start=100)
    assert torch.equal(shard, full[100:600])


_LIBDEVICE_PROBE = """
import torch, triton, triton.language as tl
from triton.language.extra.cuda import libdevice
@triton.jit
def k(x_ptr):
    tl.store(x_ptr + tl.arange(0, 4), libdevice.log(tl.load(x_ptr + tl.arange(0, 4))))
k[(1,)](torch.ones(4))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (GPU wheels)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, tests/test_gpu.py runs the compiled kernels")
def test_triton_kernel_matches_torch_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    # Some Triton versions' interpreters cannot run libdevice calls (3.9 cannot): the normal kernels then run only
    # compiled, in tests/test_gpu.py, and the ±1 kernels (the same layout and keying) are checked here.
    probe = subprocess.run([sys.executable, "-c", _LIBDEVICE_PROBE], env=env, capture_output=True, timeout=120)
    dists = [] if probe.returncode == 0 else ["--dists", "2"]
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check_perturb", *dists],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert "ALL_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_perturbed_many_writes_stream_ranges_where_asked():
    # parts of two streams (one from an offset) written into one buffer at given offsets: what the population's
    # rows take, U and V of a tensor apart
    zeros = torch.zeros(40)
    out = torch.full((100,), 7.0)
    got = P.perturbed_many([zeros[:12], zeros[:20], zeros[:8]], [3, 3, 5], 11, 1.0, starts=[0, 12, 0], out=out,
                           dst=[60, 0, 30])
    full3 = P.normal(P.key(11, 3), 0, 32)
    torch.testing.assert_close(out[60:72], full3[:12], rtol=0, atol=0)
    torch.testing.assert_close(out[0:20], full3[12:32], rtol=0, atol=0)
    torch.testing.assert_close(out[30:38], P.normal(P.key(11, 5), 0, 8), rtol=0, atol=0)
    assert torch.equal(out[20:30], torch.full((10,), 7.0))  # untouched between the ranges
    assert got[1].data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="both out and dst"):
        P.perturbed_many([zeros[:4]], [0], 1, 1.0, out=out)
    with pytest.raises(ValueError, match="hold every dst range"):
        P.perturbed_many([zeros[:4]], [0], 1, 1.0, out=out, dst=[98])
