"""Checks made before a run folder exists: nothing is computed for a run that cannot finish.

Each check raises a ValueError that names the setting (`flag`: the CLI's flag by default; the app passes its
own words) and says what to do. They need no weights: the model's files are looked at, not loaded, and layer
shapes come from a skeleton of the model on the meta device (`Backend.skeleton`).
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path

import torch
from torch import nn

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def confined_name(name: str, what: str) -> str:
    """`name` when it is a plain folder name (letters, digits, '.', '-', '_'); it can never leave its folder."""
    if not SAFE_NAME.fullmatch(name or "") or name.endswith((".tmp", ".lock")):
        raise ValueError(f"{what} {name!r}: use a plain folder name of letters, digits, '-', '_' or '.' "
                         "(up to 80 characters, starting with a letter or digit, no '/' or '..')")
    return name


def hub_offline() -> bool:
    """True when huggingface_hub is told not to use the network (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _weights_in(files: list[str], where: str) -> None:
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise ValueError(f"{where} holds only pickle weights (.bin / .pt), which can run code when loaded; "
                         "EMLoC Studio reads safetensors only: use a checkpoint that has *.safetensors files "
                         "(or convert it with safetensors' convert script on a machine you trust)")
    raise ValueError(f"{where} has no *.safetensors weights; point it at a model folder or a hub id of a model")


def check_model_source(model: str, flag: str = "--model") -> None:
    """The model is a local folder with safetensors weights, or a hub id that is downloaded (or downloadable)."""
    model = (model or "").strip()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {model}: a file, not a folder; pass the folder that holds the model")
        _weights_in([str(p) for p in path.rglob("*") if p.is_file()], f"{flag} {model}")
        return
    if model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1 or not HUB_ID.fullmatch(model):
        raise ValueError(f"{flag} {model}: no such folder; check the path (or give a hub id such as "
                         "OpenGVLab/InternVL3-1B-hf)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        local = None
    if local is not None:
        _weights_in([str(p) for p in Path(local).rglob("*") if p.is_file()], f"{flag} {model} (downloaded)")
        return
    if hub_offline():
        raise ValueError(f"{flag} {model} is not downloaded and this machine is offline (HF_HUB_OFFLINE=1), nor is "
                         f"it a folder here: download it first on a connected machine "
                         f"(huggingface-cli download {model}; for a gated model log in with `huggingface-cli login` "
                         "and accept its licence on huggingface.co), or give a local folder or the demo model")
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(model)
    except GatedRepoError:
        raise ValueError(f"{flag} {model} is gated: accept its licence on huggingface.co, then log in here with "
                         "`huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {model}: not found on the hub (a private model needs `huggingface-cli login`); "
                         "check the id, or give a local folder") from None
    except OSError as err:  # no network: requests' and httpx' connection errors are OSErrors
        raise ValueError(f"{flag} {model}: not downloaded, and the hub cannot be reached ({err}); connect to the "
                         f"network or download it first (huggingface-cli download {model})") from None
    _weights_in(files, f"{flag} {model}")


def check_device(device: str, flag: str = "--device") -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and a CUDA device only when this machine has it."""
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device or "")
    if not match:
        raise ValueError(f"{flag} {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: this machine has no CUDA GPU that PyTorch can use; use {flag} cpu "
                         "(or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_writable(folder: Path, flag: str = "--out") -> None:
    """A new run folder can be made at `folder`: its nearest existing parent takes a file (nothing is left there)."""
    parent = Path(folder).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = parent / f".emloc-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write in {parent} ({disk_words(err)}); choose a folder you can "
                         "write to") from None


def disk_words(err: OSError) -> str:
    """An OSError in plain words (a full disk and a read-only place said as such)."""
    if err.errno == errno.ENOSPC:
        return "the disk is full"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission to write there" if err.errno != errno.EROFS else "the disk is read-only"
    return err.strerror or str(err)


def check_lora_fits(skeleton: nn.Module, targets: list[str], rank: int, flag: str = "--lora-targets") -> None:
    """The LoRA targets match linear layers of the model, and `rank` fits in each of them."""
    import emloc

    try:
        names = emloc.lora_target_names(skeleton, targets)
    except ValueError as err:  # a bad regex, or one that matches no linear layer
        raise ValueError(f"{flag}: {err}") from None
    modules = dict(skeleton.named_modules())
    narrow = min(names, key=lambda n: min(modules[n].in_features, modules[n].out_features))
    width = min(modules[narrow].in_features, modules[narrow].out_features)
    if rank > width:
        raise ValueError(f"--rank {rank} is larger than the LoRA layer {narrow} ({modules[narrow].in_features} in, "
                         f"{modules[narrow].out_features} out); use --rank {width} or less")
