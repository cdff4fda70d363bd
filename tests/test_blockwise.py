"""The streamed pass (emloc.blockwise): block by block from the checkpoint's files, the same emulator as the
two-step path, each weight read once, one block in memory, and padding kept out of the statistics."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

from conftest import BLOCK_RULES, TinyTransformer
from emloc import build_emulator, collect_input_stats, load_emulator, second_moments
from emloc.blockwise import BlockwiseModel, stream_emulator
from emloc.checkpoint import CheckpointReader, meta_names


def _checkpoint(model, tmp_path, prefix=""):
    path = tmp_path / "model.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _streamed(model_file, layers=2, renames=(), reads=None, held=None) -> BlockwiseModel:
    with torch.device("meta"):
        skeleton = TinyTransformer(layers=layers)
    reader = CheckpointReader([model_file], renames)
    if reads is not None:  # count every tensor read
        original = reader.read

        def counting(name, *args, **kwargs):
            reads.append(name)
            return original(name, *args, **kwargs)
        reader.read = counting

    def enter(streamed, batch):
        embed = streamed.load("embed")
        return embed(batch["input_ids"])

    def step(streamed, name, state):
        if held is not None:  # blocks with real weights while this block runs
            held.append(sum(1 for i in range(layers) if not meta_names(streamed.model.blocks[i])))
        return streamed.model.get_submodule(name)(state)

    return BlockwiseModel(skeleton, reader, [f"blocks.{i}" for i in range(layers)], enter, step)


def _two_step(model, batches):
    expected = copy.deepcopy(model)
    stats = second_moments(collect_input_stats(expected, batches, BLOCK_RULES, progress=False))
    return expected, build_emulator(expected, BLOCK_RULES, stats, progress=False)


def test_streamed_emulator_equals_the_two_step_one(tiny_transformer, token_batches, tmp_path):
    expected, expected_report = _two_step(tiny_transformer, token_batches)
    reads, held = [], []
    streamed = _streamed(_checkpoint(tiny_transformer, tmp_path), reads=reads, held=held)
    report = stream_emulator(streamed, token_batches, BLOCK_RULES, tmp_path / "emulator", progress=False)

    assert [r.rank for r in report.layers] == [r.rank for r in expected_report.layers]
    for got, want in zip(report.layers, expected_report.layers):
        assert abs(got.error - want.error) <= 1e-4 * max(want.error, 1e-6)
    assert report.fingerprint == expected_report.fingerprint
    assert report.model_params_after == expected_report.model_params_after
    assert max(held) == 1  # one block's weights at a time
    assert len(reads) == len(set(reads))  # each weight read once
    # the written emulator, loaded on the full model, computes what the two-step emulator computes
    loaded = copy.deepcopy(tiny_transformer)
    load_emulator(loaded, tmp_path / "emulator")
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected(ids), rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "emulator").glob("emulator-*.safetensors"))) == 2  # one file per block


def test_padding_never_enters_the_statistics(tiny_transformer, tmp_path):
    torch.manual_seed(3)
    real = [torch.randint(0, 50, (1, n)) for n in (12, 7)]
    # two-step reference: each sample alone, unpadded
    _, expected_report = _two_step(tiny_transformer, [{"input_ids": ids} for ids in real])
    # streamed: one padded batch with a mask; padding tokens run through the model but are not counted
    padded = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    for row, ids in enumerate(real):
        padded[row, : ids.shape[1]], mask[row, : ids.shape[1]] = ids[0], True
    streamed = _streamed(_checkpoint(tiny_transformer, tmp_path))
    enter = streamed.enter
    streamed.enter = lambda s, batch: {"h": enter(s, batch), "mask": batch["mask"]}
    step = streamed.step
    streamed.step = lambda s, name, state: {"h": step(s, name, state["h"]), "mask": state["mask"]}
    streamed.token_mask = lambda state: state["mask"]
    # a causal model: real tokens before the padding see exactly what they see alone
    report = stream_emulator(streamed, [{"input_ids": padded, "mask": mask}], BLOCK_RULES, tmp_path / "emu",
                             progress=False)
    for got, want in zip(report.layers, expected_report.layers):
        assert abs(got.error - want.error) <= 1e-4 * max(want.error, 1e-6), got.name


def test_checkpoint_keys_are_renamed_to_module_names(tiny_transformer, token_batches, tmp_path):
    _, expected_report = _two_step(tiny_transformer, token_batches)
    streamed = _streamed(_checkpoint(tiny_transformer, tmp_path, prefix="model."), renames=[(r"^model\.", "")])
    report = stream_emulator(streamed, token_batches, BLOCK_RULES, tmp_path / "emulator", progress=False)
    assert report.fingerprint == expected_report.fingerprint
    info = json.loads((tmp_path / "emulator" / "emulator.json").read_text())
    assert set(info["layers"]) == {r.name for r in expected_report.layers if not r.dense}
