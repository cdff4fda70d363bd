"""The real models the app offers, and their weightless (`meta` device) builds for the VRAM planner.

Offline, a catalogue id is built from its config in assets/models/<name>.json (copied from the hub's
config.json files). A local folder works too, and a hub id outside the catalogue when the hub is reachable
(config files only, never weights). Which family a model is, how its files are read and how it is built (its
ArchitectureSpec: how its blocks spend activation memory, emloc/memory.py) is each family's own knowledge,
registered in pipelines/runner/registry.py (PLANNING) and written in pipelines/<family>/planning.py; this module
only asks each registered family in turn.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from emloc.architecture import ArchitectureSpec
from pipelines.runner.checks import hub_offline, hub_unreachable_reason, is_network_error
from pipelines.runner.planning import Fetch, Planning
from pipelines.runner.registry import ROOT, plannings

log = logging.getLogger(__name__)

ASSETS = ROOT / "assets" / "models"


@dataclass(frozen=True)
class CatalogueEntry:
    """A model the app offers by name."""

    model_id: str  # hub id
    display_name: str
    family: str  # ArchitectureSpec family: "flux" (images from a resolution) or "vlm" (tokens and image tiles)
    published_params: float  # parameters of the trained model as published (FLUX: the transformer)
    asset: Path  # the offline config bundle
    backend: str = ""  # the run backend that trains it (a registry name)


@dataclass
class MetaModel:
    """A weightless build of a model and how it spends memory."""

    model_id: str
    display_name: str
    family: str
    model: nn.Module  # on the meta device: the transformer (FLUX) or the whole InternVL
    arch: ArchitectureSpec
    backend: str = ""  # the run backend that trains it (a registry name)


def catalogue() -> dict[str, CatalogueEntry]:
    """Every model in assets/models/, by hub id."""
    entries = []
    for path in ASSETS.glob("*.json"):
        doc = json.loads(path.read_text())
        entries.append(CatalogueEntry(doc["id"], doc["display_name"], doc["family"], float(doc["published_params"]), path,
                                      backend_of(doc)))
    return {e.model_id: e for e in sorted(entries, key=lambda e: (e.family, e.published_params, e.model_id))}


def _find_entry(model_id: str) -> CatalogueEntry | None:
    entries = catalogue()
    if model_id in entries:
        return entries[model_id]
    short = {e.model_id.split("/")[-1].lower(): e for e in entries.values()}
    return short.get(model_id.lower())


def _read(fetch: Fetch, name: str) -> dict:
    """The config bundle of the model whose files `fetch` reads: the first registered family that knows them."""
    registered = plannings()
    for backend, planning in registered.items():
        bundle = planning.read(fetch, name)
        if bundle is not None:
            return {**bundle, "backend": backend}
    config = fetch("config.json") or fetch("transformer/config.json") or {}
    kind = config.get("model_type") or config.get("_class_name")
    raise ValueError(f"{name}: not a model the planner can read (model_type / class {kind!r}); it reads "
                     + "; ".join(p.reads for p in registered.values()))


def _memo(fetch: Fetch) -> Fetch:
    """`fetch` reading each file once (every family asks for config.json; on the hub each ask is a request)."""
    return functools.lru_cache(maxsize=None)(fetch)


def _read_folder(folder: Path) -> dict:
    """A config bundle from a local model folder."""
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has neither config.json nor model_index.json; point --model at a model folder")

    def fetch(path: str) -> dict | None:
        file = folder / path
        return json.loads(file.read_text()) if file.is_file() else None

    return _read(_memo(fetch), str(folder))


def _read_hub(model_id: str) -> dict:
    """Config files of a hub repository (no weights); fails quickly, in words, when the hub cannot be reached."""
    known = ", ".join(catalogue())
    if hub_offline():
        raise ValueError(f"unknown model {model_id!r}: not in the catalogue ({known}), not a local folder, "
                         "and the hub is offline (HF_HUB_OFFLINE); pass a catalogue id or a folder with config.json")
    unreachable = (f"unknown model {model_id!r}: not in the catalogue ({known}) and not a local folder, and the "
                   "Hugging Face hub cannot be reached ({}) to read its config. Download it into a folder on a "
                   f"machine with network (huggingface-cli download {model_id} --local-dir FOLDER) and pass that "
                   "folder, or pass a catalogue id (their plans need no network)")
    why = hub_unreachable_reason()
    if why:
        raise ValueError(unreachable.format(why))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    def fetch(path: str) -> dict | None:
        try:
            return json.loads(Path(hf_hub_download(model_id, path)).read_text())
        except RepositoryNotFoundError:  # gated ones too
            raise
        except HfHubHTTPError:  # the repository has no such file
            return None

    try:
        return _read(_memo(fetch), model_id)
    except ValueError:
        raise
    except Exception as err:
        if is_network_error(err):
            raise ValueError(unreachable.format(f"{type(err).__name__}: {err}")) from None
        if not isinstance(err, OSError):
            raise
        raise ValueError(f"unknown model {model_id!r}: not in the catalogue ({known}) and its config could not be "
                         f"read from the hub ({type(err).__name__}: no such repository, or it is gated and needs a "
                         "login); check the id, or pass a local folder with config.json") from None


def _planning_of(bundle: dict) -> tuple[str, Planning]:
    """(backend name, Planning) of the family that builds `bundle`: its "backend" when it names one, else the
    first registered family that claims it."""
    registered = plannings()
    if bundle.get("backend"):
        if bundle["backend"] not in registered:
            raise ValueError(f"unknown backend {bundle['backend']!r}; registered: {', '.join(registered)}")
        return bundle["backend"], registered[bundle["backend"]]
    for name, planning in registered.items():
        if planning.claims(bundle):
            return name, planning
    raise ValueError(f"unknown model family {bundle.get('family')!r}; the planner reads "
                     + "; ".join(p.reads for p in registered.values()))


def meta_model_from_bundle(bundle: dict) -> tuple[nn.Module, ArchitectureSpec]:
    """Build a config bundle (the format of assets/models/*.json, see pipelines/runner/planning.py) on the meta
    device, by the family that claims it."""
    return _planning_of(bundle)[1].build(bundle)


@functools.lru_cache(maxsize=16)
def load_meta_model(id_or_path: str) -> MetaModel:
    """A catalogue id, a local folder or a hub id, built on the meta device (cached: build once per process)."""
    if not isinstance(id_or_path, str) or not id_or_path.strip():
        raise ValueError("give a model: a catalogue id such as black-forest-labs/FLUX.1-dev, or a local folder")
    entry = _find_entry(id_or_path)
    if entry is not None:
        bundle, model_id, name = json.loads(entry.asset.read_text()), entry.model_id, entry.display_name
    elif Path(id_or_path).expanduser().is_dir():
        folder = Path(id_or_path).expanduser()
        bundle, model_id, name = _read_folder(folder), str(folder), folder.name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", id_or_path):
        bundle, model_id, name = _read_hub(id_or_path), id_or_path, id_or_path.split("/")[-1]
    else:
        raise ValueError(f"unknown model {id_or_path!r}: not in the catalogue ({', '.join(catalogue())}) "
                         "and not a folder; pass a catalogue id, a hub id (owner/name) or a local folder")
    model, arch = meta_model_from_bundle(bundle)
    log.info("built %s on the meta device", model_id)
    return MetaModel(model_id, name, bundle["family"], model, arch, backend_of(bundle))


def backend_of(bundle: dict) -> str:
    """The run backend of a config bundle: the registered family that builds it."""
    return _planning_of(bundle)[0]
