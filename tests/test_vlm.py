"""The InternVL backend: loading, the processor-equivalent packing, the three data formats, bad data,
and a whole headless run (`launch.py train --backend vlm` then `launch.py preview`) on a tiny checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.runner import cli
from pipelines.runner.data import DataError
from pipelines.internvl.backend import (ChatPacker, VlmBackend, answer_loss, collate, default_lora_targets, default_rules,
                           load_vlm, load_vlm_processing)
from pipelines.internvl.data import (QASample, exact_match, pairs_to_samples, read_internvl_jsonl, read_internvl_meta,
                                read_qa_data, token_f1, write_qa_jsonl)
from vlm_fixtures import IMAGE_SEQ_LENGTH, save_tiny_internvl, write_colour_csv

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def parts(checkpoint):
    return load_vlm_processing(str(checkpoint))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, list[tuple[str, str, str]]]:
    folder = tmp_path_factory.mktemp("colours")
    rows = write_colour_csv(folder)
    return folder, rows


# -------------------------------------------------------------------------------- loading and packing


def reference_processor(parts):
    """transformers' own InternVLProcessor, with the attributes its __init__ sets: __init__ itself needs
    torchvision (for the video processor), which this machine lacks, but __call__ does not."""
    from transformers import InternVLProcessor

    tokenizer = parts.tokenizer
    processor = InternVLProcessor.__new__(InternVLProcessor)
    processor.tokenizer, processor.image_processor, processor.video_processor = tokenizer, parts.image_processor, None
    processor.chat_template = tokenizer.chat_template
    processor.image_seq_length = parts.image_seq_length
    processor.start_image_token, processor.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
    processor.start_image_token_id = tokenizer.start_image_token_id
    processor.end_image_token_id = tokenizer.end_image_token_id
    processor.image_token, processor.image_token_id = tokenizer.context_image_token, tokenizer.context_image_token_id
    processor.video_token = tokenizer.video_token
    processor.multimodal_pattern = re.compile(
        f"(?P<image>{re.escape(processor.image_token)})|(?P<video>{re.escape(processor.video_token)})")
    return processor


def test_checkpoint_loads_through_the_real_loading_code(checkpoint, parts):
    model = load_vlm(str(checkpoint))
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert parts.image_seq_length == IMAGE_SEQ_LENGTH
    assert type(parts.image_processor).__name__.startswith("GotOcr2ImageProcessor")
    assert parts.tokenizer.context_image_token == "<IMG_CONTEXT>"


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_packed_inputs_equal_internvl_processor_output(checkpoint, parts, max_tiles):
    model = load_vlm(str(checkpoint))
    image = Image.new("RGB", (80, 40), (10, 200, 30))  # wide: 2 tiles + a thumbnail when tiling is on
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length, max_tiles=max_tiles)
    sample = QASample((), ((QUESTION, "green"),))
    mine = packer.encode_prompt(sample, images=[image])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = parts.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = reference_processor(parts)(images=[image], text=[prompt], max_patches=max_tiles, return_tensors="pt")
    assert torch.equal(mine["input_ids"], theirs["input_ids"][0])
    assert torch.equal(mine["pixel_values"], theirs["pixel_values"])
    tiles = 1 if max_tiles == 1 else 3
    assert mine["pixel_values"].shape[0] == tiles
    with torch.no_grad():
        ours = model(input_ids=mine["input_ids"][None], pixel_values=mine["pixel_values"]).logits
        reference = model(input_ids=theirs["input_ids"], pixel_values=theirs["pixel_values"]).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_packed_prompt_matches_a_hand_built_expectation(parts):
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
    encoded = packer.encode_prompt(QASample((), ((QUESTION, "red"),)), images=[Image.new("RGB", (50, 50))])
    expected = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * IMAGE_SEQ_LENGTH + "</img>\n" + QUESTION
                + "<|im_end|>\n<|im_start|>assistant\n")
    assert encoded["input_ids"].tolist() == parts.tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_labels_cover_only_the_answers_and_their_end_of_turn(parts, colour_data):
    folder, rows = colour_data
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length, system_prompt="Be brief.")
    sample = QASample((str(folder / rows[0][0]),), ((QUESTION, "red"), ("And the background?", "none")))
    encoded = packer.encode(sample)
    kept = encoded["input_ids"][encoded["labels"] != -100]
    assert parts.tokenizer.decode(kept) == "red<|im_end|>none<|im_end|>"
    assert int((encoded["input_ids"] == parts.tokenizer.context_image_token_id).sum()) == IMAGE_SEQ_LENGTH
    batch = collate([encoded, packer.encode(QASample((), (("Say hi", "hi"),)))], parts.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    assert int(batch["attention_mask"][1].sum()) < batch["input_ids"].shape[1]  # the text-only one is padded


def test_default_rules_compress_vision_and_language_and_keep_the_rest_dense(checkpoint):
    from emloc import lora_target_names, normalise_rules, target_linears

    model = load_vlm(str(checkpoint))
    targets = target_linears(model, normalise_rules(default_rules(0.4, 0.6)))
    assert len(targets) == 2 * 7 + 2 * 6  # 7 linears per Qwen2 layer, 6 per ViT layer
    assert {ratio for name, (_, ratio) in targets.items() if "vision_tower" in name} == {0.6}
    assert not [n for n in targets if "projector" in n or "lm_head" in n or "embed" in n]
    lora = lora_target_names(model, default_lora_targets())
    assert len(lora) == 14 and all(n.startswith("model.language_model.layers.") for n in lora)


def test_a_pickle_only_checkpoint_is_refused(tmp_path, checkpoint):
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(checkpoint / name, tmp_path / name)
    torch.save(load_vlm(str(checkpoint)).state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights
    with pytest.raises(OSError, match="safetensors"):
        load_vlm(str(tmp_path))


# -------------------------------------------------------------------------------- data formats


def test_each_input_format_parses_to_the_same_samples(colour_data, tmp_path):
    folder, rows = colour_data
    simple_jsonl = folder / "simple" / "qa.jsonl"
    simple_jsonl.parent.mkdir(exist_ok=True)
    simple_jsonl.write_text("".join(json.dumps({"image": f"../{i}", "question": q, "answer": a}) + "\n"
                                    for i, q, a in rows))
    internvl = folder / "internvl.jsonl"
    internvl.write_text("".join(json.dumps({"id": n, "image": i, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}) + "\n"
        for n, (i, q, a) in enumerate(rows)))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"colours": {"root": str(folder), "annotation": str(internvl), "repeat_time": 1,
                                            "length": len(rows)}}))
    formats = {
        "folder with qa.csv": read_qa_data(folder).samples,
        "qa.jsonl": read_qa_data(simple_jsonl).samples,
        "InternVL jsonl": read_internvl_jsonl(internvl).samples,
        "InternVL meta": read_internvl_meta(meta).samples,
        "pairs in code": pairs_to_samples(rows, base=folder).samples,
    }
    expected = [QASample((str((folder / i).resolve()),), ((q, a),)) for i, q, a in rows]
    for name, samples in formats.items():
        assert samples == expected, name
    copy = tmp_path / "copy"
    write_qa_jsonl(expected, copy)  # the run folder's copy reads back as the same conversations
    assert [(s.turns, len(s.images)) for s in read_qa_data(copy / "qa.jsonl").samples] == \
           [(s.turns, 1) for s in expected]


def test_internvl_format_allows_multi_turn_text_only_and_system_lines(colour_data):
    folder, rows = colour_data
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
        {"image": rows[0][0], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"image": [rows[1][0], rows[2][0]], "conversations": [
            {"from": "human", "value": "First <image> then <image>: same?"}, {"from": "gpt", "value": "no"}]},
    ]) + "\n")
    report = read_qa_data(path)
    text_only, multi_turn, two_images = report.samples
    assert text_only.images == () and text_only.system == "Be brief."
    assert multi_turn.turns == (("What colour?", "red"), ("Sure?", "yes"))
    assert two_images.question == "First <image> then <image>: same?" and len(two_images.images) == 2
    assert (report.text_only, report.multi_turn) == (1, 1)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing image", r"qa\.jsonl line 2: image .*nope\.png.* not found"),
    ("empty answer", r"qa\.jsonl line 1: empty answer"),
    ("malformed line", r"qa\.jsonl line 3: not valid JSON"),
    ("not an image", r"qa\.jsonl line 1: .*fake\.png.*not a readable JPEG, PNG or WebP image"),
    ("csv without columns", r"qa\.csv has the columns \['picture', 'q', 'answer'\].*missing: image, question"),
])
def test_bad_data_gets_a_clear_message(tmp_path, colour_data, case, message):
    folder, rows = colour_data
    good = json.dumps({"image": str(folder / rows[0][0]), "question": QUESTION, "answer": "red"})
    if case == "missing image":
        source = _write(tmp_path / "qa.jsonl", good + "\n" + json.dumps(
            {"image": "nope.png", "question": QUESTION, "answer": "red"}) + "\n")
    elif case == "empty answer":
        source = _write(tmp_path / "qa.jsonl", json.dumps(
            {"image": str(folder / rows[0][0]), "question": QUESTION, "answer": "  "}) + "\n")
    elif case == "malformed line":
        source = _write(tmp_path / "qa.jsonl", f"{good}\n{good}\n{{\"image\": \"a.png\", \"question\": \n")
    elif case == "not an image":
        _write(tmp_path / "fake.png", "this is text, not a picture")
        source = _write(tmp_path / "qa.jsonl", json.dumps({"image": "fake.png", "question": QUESTION,
                                                           "answer": "red"}) + "\n")
    else:
        source = _write(tmp_path / "qa.csv", "picture,q,answer\nimages/red.png,What?,red\n")
    with pytest.raises(DataError, match=message):
        read_qa_data(source)


def test_answer_metrics():
    assert exact_match("The Red.", "red") == 1.0 and exact_match("dark red", "red") == 0.0
    assert token_f1("dark red", "red") == pytest.approx(2 / 3) and token_f1("blue", "red") == 0.0


# -------------------------------------------------------------------------------- a whole headless run


def test_gradient_checkpointing_keeps_the_lora_gradients(checkpoint, parts, colour_data):
    import emloc

    folder, rows = colour_data
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
    batch = collate([packer.encode(s) for s in pairs_to_samples(rows[:2], base=folder).samples],
                    parts.tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = load_vlm(str(checkpoint))
        if checkpointing:
            VlmBackend.enable_gradient_checkpointing(None, model)
        torch.manual_seed(0)  # the same LoRA A and B in both models
        peft_model = emloc.attach_lora(model, emloc.LoraSettings(rank=4, targets=default_lora_targets()))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # B = 0 at init would give A no gradient
        peft_model.train()
        peft_model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 14
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_checkpointing_keeps_the_frozen_vision_tower_out_of_the_graph(checkpoint, parts, colour_data):
    """Enabling checkpointing (and PEFT attaching the adapter) hooks every sub-model's input embeddings to require
    grads; the backend keeps that to the language model, so backward never recomputes the frozen vision tower.
    A LoRA target the user puts in the vision tower still trains."""
    import emloc
    from pipelines.internvl.backend import VISION_LINEARS

    folder, rows = colour_data
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
    batch = collate([packer.encode(s) for s in pairs_to_samples(rows[:2], base=folder).samples],
                    parts.tokenizer.pad_token_id)
    for targets, vision_trains in ((default_lora_targets(), False), (default_lora_targets() + [VISION_LINEARS], True)):
        model = load_vlm(str(checkpoint))
        VlmBackend.enable_gradient_checkpointing(None, model)
        torch.manual_seed(0)
        peft_model = emloc.attach_lora(model, emloc.LoraSettings(rank=4, targets=targets))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        peft_model.train()
        seen = []
        model.model.vision_tower.encoder.layer[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t))
                                                     .requires_grad), with_kwargs=True)
        loss = peft_model(**batch).loss
        assert seen == [False]  # the tower's input is not in the graph, with or without a LoRA in it
        loss.backward()
        vision = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "vision_tower" in n}
        assert bool(vision) == vision_trains
        assert all(g is not None and g.abs().sum() > 0 for g in vision.values())


@pytest.fixture(scope="module")
def finished_run(checkpoint, colour_data, tmp_path_factory):
    folder, _ = colour_data
    out = tmp_path_factory.mktemp("runs") / "colours"
    code = cli.main(["--backend", "vlm", "--model", str(checkpoint), "--data", str(folder / "qa.csv"),
                     "--ratio", "0.4", "--steps", "20", "--lr", "3e-3", "--rank", "8", "--calibration-samples", "8",
                     "--no-gradient-checkpointing", "--device", "cpu", "--max-new-tokens", "6", "--quiet",
                     "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.slow  # a whole InternVL run (the finished_run fixture): 35 s
def test_training_lowers_the_full_models_answer_loss(finished_run, checkpoint, parts, colour_data):
    from peft import PeftModel

    folder, rows = colour_data
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
    encoded = [packer.encode(s) for s in pairs_to_samples(rows, base=folder).samples]
    pad = parts.tokenizer.pad_token_id
    base = answer_loss(load_vlm(str(checkpoint)), encoded, pad)
    corrected = PeftModel.from_pretrained(load_vlm(str(checkpoint)), str(finished_run / "lora" / "corrected"))
    tuned = answer_loss(corrected, encoded, pad)
    assert tuned < 0.7 * base, (base, tuned)
    info = json.loads((finished_run / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    assert info["data"]["samples"] == 8
    assert "PeftModel.from_pretrained" in (finished_run / "lora" / "README.md").read_text()


@pytest.mark.slow  # the same finished run
def test_previews_show_every_model_side_by_side_with_scores(finished_run, capsys):
    scores = json.loads((finished_run / "previews" / "previews.json").read_text())
    labels = ["base", "emulator + LoRA", "full + corrected LoRA", "full + uncorrected LoRA"]
    assert list(scores["scores"]) == labels
    assert all(0.0 <= s["token_f1"] <= 1.0 and s["n"] == 4 for s in scores["scores"].values())
    assert len(scores["items"]) == 4 and all(list(item["answers"]) == labels for item in scores["items"])
    image = finished_run / "data" / "images" / "00000-red.png"
    code = cli.preview(["--run", str(finished_run), "--name", "typed", "--question", QUESTION,
                        "--image", str(image), "--max-new-tokens", "4"])
    assert code == 0
    typed = json.loads((finished_run / "typed" / "previews.json").read_text())
    assert [item["question"] for item in typed["items"]] == [QUESTION] and typed["scores"] == {}
    table = (finished_run / "typed" / "previews.md").read_text()
    assert table.startswith("| question | image | reference | " + " | ".join(labels))


def test_train_command_refuses_bad_data_before_making_a_run_folder(tmp_path, checkpoint, colour_data, capsys):
    folder, rows = colour_data
    good = json.dumps({"image": str(folder / rows[0][0]), "question": QUESTION, "answer": "red"})
    data = _write(tmp_path / "qa.jsonl", f"{good}\n{good}\nnot json\n")
    out = tmp_path / "run"
    code = cli.main(["--backend", "vlm", "--model", str(checkpoint), "--data", str(data), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "qa.jsonl line 3: not valid JSON" in capsys.readouterr().err


def test_training_batches_visit_every_sample_once_per_epoch_in_a_repeatable_order():
    from pipelines.runner import RunSettings
    from pipelines.internvl.backend import VlmSettings

    backend = VlmBackend(RunSettings(model="unused", batch_size=3, seed=5), VlmSettings(), torch.device("cpu"))
    backend.encoded = [{}] * 8
    drawn = [i for step in range(8) for i in backend.batch_indices(step)]  # 24 = three epochs of 8
    for epoch in range(3):
        assert sorted(drawn[8 * epoch: 8 * epoch + 8]) == list(range(8))
    assert drawn[:8] != drawn[8:16]  # a new order each epoch
    assert [backend.batch_indices(step) for step in range(8)] == [drawn[3 * s: 3 * s + 3] for s in range(8)]
