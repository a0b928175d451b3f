"""``memopt consolidate CKPT OUT_DIR``: a checkpoint of an :class:`~lightning_memopt.HFCausalLM` fit as a plain
Hugging Face ``save_pretrained`` folder (weights, config, tokenizer) that ``AutoModelForCausalLM.from_pretrained``
loads.

``CKPT`` is a sharded checkpoint folder (``FSDP2Strategy(save_distributed_checkpoint=True)``: one
torch.distributed.checkpoint file per rank plus ``meta.pt``) written by any number of processes, or a full ``.ckpt``
file. It runs in one process without a process group: the model is built on the meta device from the checkpoint's
hyperparameters, and each weight is read once into its final tensor (one copy of the weights in host memory).
Optimizer state is not read. peft LoRA adapters (``lora_rank > 0``) are merged into the weights, and so are
DFOLoRA's (C-LoRA/F-LoRA), which live in its callback state: rebuilt from their z's, statistics and seeded maps.

Example::

    memopt consolidate runs/lightning_logs/version_0/checkpoints/step=1000.ckpt smollm2-sst2
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('smollm2-sst2')"
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_memopt.models.hf import dtype_named

_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
_PREFIX = "model."  # HFCausalLM keeps the HF model in ``self.model``


def _skeleton(hp: dict[str, Any]) -> torch.nn.Module:
    """The HF model of an HFCausalLM with these hyperparameters, on the meta device (no weights allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_memopt.tokenization import split_gguf

    if hp.get("model_config") is not None:
        cfg = dict(hp["model_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        path, gguf = split_gguf(hp["model_name_or_path"], hp.get("gguf_file"))
        kw: dict[str, Any] = {"trust_remote_code": bool(hp.get("trust_remote_code", False))}
        if gguf is not None:
            kw["gguf_file"] = gguf
        config = AutoConfig.from_pretrained(path, **kw)
    dtype = hp.get("torch_dtype")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, **({"dtype": dtype_named(dtype)} if isinstance(dtype, str) else {})
        )
        if int(hp.get("lora_rank") or 0) > 0:
            from lightning_memopt.models.hf import _with_lora, lora_target_list

            model = _with_lora(model, int(hp["lora_rank"]), float(hp.get("lora_alpha", 16.0)),
                               lora_target_list(hp.get("lora_targets", ("q_proj", "v_proj"))))
    return model


def _read_sharded(path: Path, keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights of a sharded checkpoint folder, whole, as plain CPU tensors (no process group)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        item = meta.get(f"state_dict.{_PREFIX}{key}")
        if item is None or not hasattr(item, "size"):
            continue
        out[f"{_PREFIX}{key}"] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    state = {"state_dict": out}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is .*", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["state_dict"]


def load_checkpoint_meta(ckpt: str | os.PathLike, weights_only: bool = False) -> dict[str, Any]:
    """Everything but the weights and optimizer states of a checkpoint (file or sharded folder); ``weights_only``
    reads a file as Lightning reads its hyperparameters (tensors and plain types only)."""
    path = Path(ckpt)
    if path.is_dir():
        if not (path / _META).is_file():
            raise ValueError(f"{path} is a folder without {_META}: not a sharded Lightning checkpoint.")
        return torch.load(path / _META, map_location="cpu", weights_only=False)
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"{path} holds no state_dict: not a Lightning checkpoint (a .ckpt file, or the folder of a "
                         f"sharded one, not a file inside it).")
    return {k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")}


def consolidate(
    ckpt: str | os.PathLike, out_dir: str | os.PathLike, dtype: Optional[str] = None, tokenizer: bool = True,
    overwrite: bool = False, return_model: bool = True,
) -> Optional[torch.nn.Module]:
    """Write the HF model of an HFCausalLM checkpoint to ``out_dir`` with ``save_pretrained``; returns the model
    (``from_pretrained(out_dir)``; None without ``return_model``).

    Args:
        ckpt: a sharded checkpoint folder (written by any number of processes) or a full ``.ckpt`` file.
        out_dir: the output folder (created); a folder that holds files is refused unless ``overwrite``.
        dtype: cast the weights (e.g. ``"bfloat16"``); None keeps the checkpoint's.
        tokenizer: also save the module's tokenizer there (when it has one that can be saved).
        overwrite: write into a folder that holds files (its model files are replaced, a stale shard index removed).
        return_model: load the written model back and return it (the one built here keeps its non-persistent
            buffers, rotary frequencies, on the meta device: it could be saved but not run).
    """
    path = Path(ckpt)
    _check_out_dir(path, Path(out_dir), overwrite)
    if dtype is not None:
        dtype_named(dtype, "--dtype")  # before reading every weight
    meta = load_checkpoint_meta(path)
    hp = dict(meta.get("hyper_parameters") or {})
    if not (hp.get("model_config") or hp.get("model_name_or_path")):
        raise ValueError(
            f"{path} has no HFCausalLM hyperparameters (model_name_or_path or model_config): consolidate reads "
            f"checkpoints of lightning_memopt.HFCausalLM fits."
        )
    model = _skeleton(hp)
    wanted = model.state_dict(keep_vars=True)
    if path.is_dir():
        weights = _read_sharded(path, wanted)
    else:
        weights = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    sd = {k[len(_PREFIX):]: v for k, v in weights.items() if k.startswith(_PREFIX)}
    missing = [k for k in wanted if k not in sd]
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied:
        raise ValueError(f"{path} lacks {len(set(missing) - tied)} weights of the model, e.g. "
                         f"{sorted(set(missing) - tied)[:3]}: is it a checkpoint of this model?")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()
    if int(hp.get("lora_rank") or 0) > 0:
        model = model.merge_and_unload()
    _merge_dfo_adapters(model, meta)
    if dtype is not None:
        model = model.to(dtype_named(dtype, "--dtype"))
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        stale = Path(out_dir) / index  # it would name another model's shards beside this one's weights
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(str(out_dir))
    if tokenizer:
        _save_tokenizer(hp, out_dir)
    if not return_model:
        return None
    from transformers import AutoModelForCausalLM

    saved_dtype = next(model.parameters()).dtype
    del model, weights, sd  # the checkpoint's copy, before the saved one is read back
    return AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=saved_dtype, trust_remote_code=bool(hp.get("trust_remote_code", False))
    ).eval()


def _check_out_dir(ckpt: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that would lose files: the checkpoint itself (or a folder inside it), or a folder that
    holds files (a base model's own folder, another save) unless ``overwrite``."""
    ckpt_r, out_r = ckpt.resolve(), out_dir.resolve()
    if out_r == ckpt_r or ckpt_r in out_r.parents:
        raise ValueError(f"{out_dir} is the checkpoint {ckpt} (or inside it): give another folder for the model.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{out_dir} already holds files (a model saved there, the base model's own folder?), which consolidate "
            f"would replace: give a new folder, or pass --overwrite (overwrite=True) to write over it."
        )


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def _merge_dfo_adapters(model: torch.nn.Module, meta: dict[str, Any]) -> bool:
    """Fold the checkpoint's DFOLoRA adapters into the model's target weights (``W += B A`` per target, as
    ``DFOLoRA.merge()`` does after a fit); False where the checkpoint has none."""
    states = [v for v in (meta.get("callbacks") or {}).values()
              if isinstance(v, dict) and v.get("memopt_method") == "DFOLoRA"]
    if not states or not states[0].get("state") or states[0]["state"].get("merged"):
        return False  # none, or merge() folded them into the checkpoint's weights already
    settings, state = states[0]["settings"], states[0]["state"]
    if state.get("maps", "device") != "philox":
        warnings.warn(
            "This checkpoint's DFOLoRA adapters were made with random maps drawn by the training device's own "
            "generator (checkpoints from before the maps were keyed), which this machine cannot redraw: the "
            "consolidated model is the base model. Resume the fit with DFOLoRA on the same kind of device, call "
            "DFOLoRA.merge() and save the module to keep them.",
            stacklevel=3,
        )
        return False
    from lightning_memopt.dfo.lora import ZLoRA

    root = torch.nn.Module()
    root.model = model  # the module names the callback matched its target_pattern on (HFCausalLM's)
    lora = ZLoRA(root, settings["rank"], settings["d"], settings["target_pattern"], settings["seed"],
                 settings["sigma"], settings["init_scale"])
    lora.restore(state)
    lora.merge()
    return True


def _save_tokenizer(hp: dict[str, Any], out_dir: str | os.PathLike) -> None:
    from lightning_memopt.tokenization import load_tokenizer

    name = hp.get("tokenizer") or hp.get("model_name_or_path") or "builtin"
    try:
        tok = load_tokenizer(name, hp.get("gguf_file") if hp.get("tokenizer") is None else None,
                             bool(hp.get("trust_remote_code", False)))
    except Exception as err:  # the weights are what matters; say why the tokenizer is not there
        warnings.warn(f"consolidate: tokenizer {name!r} not saved ({err}).", stacklevel=3)
        return
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out_dir))


def main(argv: Optional[list[str]] = None, prog: str = "memopt consolidate") -> None:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A checkpoint of an HFCausalLM fit (a sharded folder written by any number of processes, or a "
        ".ckpt file) as a Hugging Face save_pretrained folder that from_pretrained loads.",
    )
    parser.add_argument("ckpt", help="sharded checkpoint folder or .ckpt file of an HFCausalLM fit")
    parser.add_argument("out_dir", help="output folder for save_pretrained")
    parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not save the tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    args = parser.parse_args(argv)
    if not os.path.exists(args.ckpt):
        parser.error(f"{args.ckpt} does not exist: give a checkpoint folder (sharded) or .ckpt file")
    if os.path.isfile(args.out_dir):
        parser.error(f"{args.out_dir} is a file: give a folder to write the model into")
    from torch.distributed.checkpoint import CheckpointException  # a BaseException, so named on its own

    try:
        consolidate(args.ckpt, args.out_dir, dtype=args.dtype, tokenizer=not args.no_tokenizer,
                    overwrite=args.overwrite, return_model=False)
    except ValueError as err:
        parser.error(str(err))
    except (OSError, RuntimeError) as err:  # not a checkpoint torch can read; a base model this machine lacks
        parser.error(f"{args.ckpt}: {err}")
    except CheckpointException as err:  # a shard file missing from a sharded folder
        parser.error(f"{args.ckpt}: a shard could not be read ({err}); copy every rank's file of the folder.")
    print(f"{prog}: wrote {args.out_dir}")
