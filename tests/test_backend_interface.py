"""The backend interface: a small required part that Python enforces, and families that plug into the planner
through the registry alone (the planner knows no family by name)."""

from __future__ import annotations

import inspect
import json

import pytest
from torch import nn

from emloc.architecture import ArchitectureSpec, BlockStack
from pipelines.planner import catalogue
from pipelines.runner import Backend, registry
from pipelines.runner.backend import streams
from pipelines.runner.planning import Planning, on_meta

REQUIRED = {"load_model", "default_rules", "default_lora_targets", "calibration_batches", "training_loss", "generate",
            "write_previews"}


def test_the_required_part_is_the_seven_abstract_methods_and_a_backend_missing_one_cannot_be_made():
    assert Backend.__abstractmethods__ == REQUIRED

    class Incomplete(Backend):
        def load_model(self, device):
            return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="training_loss"):
        Incomplete(None, None, "cpu")


@pytest.mark.parametrize("name", registry.backend_names())
def test_every_registered_backend_is_complete_and_has_a_planning(name):
    backend = registry.backend_class(name)
    assert not inspect.isabstract(backend), backend.__abstractmethods__
    assert backend.data_kind in ("images", "qa") and backend.preview_kind in ("images", "answers")
    assert streams(backend)  # every shipped family streams models larger than memory
    assert isinstance(registry.plannings()[name], Planning)


# A family the planner has never heard of: one Linear "block", read from a config.json with model_type "toy".
def _toy_build(bundle: dict):
    width = bundle["config"]["width"]
    model = on_meta(lambda: nn.Sequential(nn.Linear(width, width)))
    arch = ArchitectureSpec(family="vlm", stacks=(BlockStack("toy", "0", width, "text", width),),
                            default_compress=(r"0",), default_lora_targets=(r"0",))
    return model, arch


def _toy_read(fetch, name):
    config = fetch("config.json")
    return {"family": "toy", "config": config} if config and config.get("model_type") == "toy" else None


TOY = Planning(read=_toy_read, claims=lambda bundle: bundle.get("family") == "toy", build=_toy_build,
               reads="toys (config.json model_type 'toy')")


def test_a_family_registered_only_in_the_registry_is_read_and_built_by_the_planner(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.PLANNING, "toy", f"{__name__}:TOY")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy", "width": 8}))
    meta = catalogue.load_meta_model.__wrapped__(str(tmp_path))  # uncached: the registry changed
    assert meta.backend == "toy" and sum(p.numel() for p in meta.model.parameters()) == 8 * 8 + 8
    assert catalogue.backend_of({"family": "toy", "config": {"width": 2}}) == "toy"


def test_a_model_no_family_reads_is_refused_naming_what_the_planner_reads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"not a model the planner can read \(model_type / class 'llama'\).*FLUX\.1"):
        catalogue.load_meta_model.__wrapped__(str(tmp_path))
