"""Checks made before a run folder exists: nothing is computed for a run that cannot finish.

Each check raises a ValueError that names the setting (`flag`: the CLI's flag by default; the app passes its
own words) and says what to do. They need no weights: the model's files are looked at, not loaded, and layer
shapes come from a skeleton of the model on the meta device (`Backend.skeleton`).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

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


class HubUnreachable(ValueError):
    """A hub id was given, the model is not downloaded here, and the Hugging Face hub cannot be reached."""


# huggingface_hub 2.4 raises httpx2's errors, which are not OSErrors; older versions raise requests' (OSErrors).
# Matched by module so that none of these libraries has to be importable.
NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
# One TCP connection to the hub decides quickly: huggingface_hub itself retries a refused connection 5 times
# over ~23 s (1 + 2 + 4 + 8 + 8 s) before it gives up.
HUB_PROBE_SECONDS = 5.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_network_error(err: BaseException) -> bool:
    """True for "the hub could not be reached" (no network, refused, timed out, offline mode), False for an
    answer from the hub (not found, gated: an `HfHubHTTPError`) and for anything else."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(err, HfHubHTTPError):
        return False
    if isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return any(c.__module__.split(".")[0] in NETWORK_MODULES for c in type(err).__mro__)


def hub_unreachable_reason(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the hub's endpoint (HF_ENDPOINT, huggingface.co by default) cannot be reached, or None when a TCP
    connection to it opens within `timeout` seconds. Behind a proxy nothing is probed (None): the connection
    goes through the proxy, and a failure there is caught where the hub is used."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{url.scheme}://{url.netloc}: {err.strerror or err}"
    return None


def hub_unreachable(model: str, flag: str, why: str) -> HubUnreachable:
    """The error for a hub id that is neither downloaded nor reachable, saying what to do instead."""
    return HubUnreachable(
        f"{flag} {model}: the Hugging Face hub cannot be reached ({why}) and the model is not downloaded here. "
        f"Download it into a folder on a machine with network (huggingface-cli download {model} --local-dir "
        f"FOLDER) and give that folder as {flag}, or set HF_HUB_OFFLINE=1 to use only downloaded models")


def _hub_files(model: str, flag: str) -> list[str]:
    """The files of hub repository `model`; raises ValueError in words when it cannot be listed."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    why = hub_unreachable_reason()
    if why:
        raise hub_unreachable(model, flag, why)
    try:
        return HfApi().list_repo_files(model)
    except GatedRepoError:
        raise ValueError(f"{flag} {model} is gated: accept its licence on huggingface.co, then log in here with "
                         "`huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {model}: not found on the hub (a private model needs `huggingface-cli login`); "
                         "check the id, or give a local folder") from None
    except Exception as err:
        if is_network_error(err):
            raise hub_unreachable(model, flag, f"{type(err).__name__}: {err}") from None
        raise


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
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # downloaded files first: no network needed
        local = snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        local = None
    if local is not None:
        _weights_in([str(p) for p in Path(local).rglob("*") if p.is_file()], f"{flag} {model} (downloaded)")
        return
    if hub_offline():
        raise ValueError(f"{flag} {model} is not downloaded and this machine is offline (HF_HUB_OFFLINE=1), nor is "
                         "it a folder here: download it into a folder on a machine with network (huggingface-cli "
                         f"download {model} --local-dir FOLDER; for a gated model log in with `huggingface-cli login` "
                         f"and accept its licence on huggingface.co) and give that folder as {flag}, or use the demo "
                         "model")
    files = _hub_files(model, flag)
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
