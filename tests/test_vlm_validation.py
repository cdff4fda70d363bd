"""Issue 29 item 1 on the InternVL side: held-out questions (the last ones, and a separate validation file) and
their scores at a sample round: validation loss over answer tokens, exact match and token F1 of greedy answers."""

from __future__ import annotations

import pytest
import torch

from pipelines.internvl.backend import VlmBackend, VlmSettings, load_vlm
from pipelines.internvl.data import exact_match, token_f1
from pipelines.internvl.inputs import generate_answer
from pipelines.runner import RunSettings

from vlm_fixtures import save_tiny_internvl, write_colour_csv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def colour_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    write_colour_csv(folder)
    return folder / "qa.csv"


def _backend(checkpoint, csv, tmp_path, batch_size=1, **settings):
    backend = VlmBackend(RunSettings(model=str(checkpoint), batch_size=batch_size, calibration_samples=8),
                         VlmSettings(data=str(csv), max_new_tokens=4, **settings), torch.device("cpu"))
    backend.validate()
    data = tmp_path / f"data-{batch_size}"
    backend.copy_data(data)
    backend.use_data(data)
    return backend


def test_the_last_questions_and_the_validation_file_are_held_out(checkpoint, colour_csv, tmp_path):
    backend = _backend(checkpoint, colour_csv, tmp_path, holdout=3, validation_data=str(colour_csv))
    assert len(backend.samples) == 5 and len(backend.held_out) == 3 + 8
    assert backend.data_settings(tmp_path / "d")["validation_data"].endswith("validation/qa.jsonl")


def test_holding_out_every_question_is_refused_in_the_words_of_the_screen(checkpoint, colour_csv):
    backend = VlmBackend(RunSettings(model=str(checkpoint), calibration_samples=8),
                         VlmSettings(data=str(colour_csv), holdout=8), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Held-out questions \(--holdout\) is 8 but there are 8 questions"):
        backend.validate()


def test_validation_scores_weigh_answer_tokens_alike_whatever_the_batch(checkpoint, colour_csv, tmp_path):
    model = load_vlm(str(checkpoint)).eval()
    scores = {}
    for batch_size in (1, 3):
        backend = _backend(checkpoint, colour_csv, tmp_path, batch_size=batch_size, holdout=4)
        scores[batch_size] = backend.validation_scores(model)
    assert set(scores[1]) == {"validation_loss", "exact_match", "token_f1"}
    assert scores[1]["validation_loss"] == pytest.approx(scores[3]["validation_loss"], rel=1e-5)
    assert scores[1]["validation_loss"] > 0
    answers = [generate_answer(model, backend.packer, s, 4, torch.device("cpu")) for s in backend.held_out]
    assert scores[1]["exact_match"] == pytest.approx(sum(exact_match(a, s.answer) for a, s in
                                                         zip(answers, backend.held_out)) / 4)
    assert scores[1]["token_f1"] == pytest.approx(sum(token_f1(a, s.answer) for a, s in
                                                      zip(answers, backend.held_out)) / 4)


def test_no_held_out_questions_means_no_validation_scores(checkpoint, colour_csv, tmp_path):
    backend = _backend(checkpoint, colour_csv, tmp_path)
    assert backend.validation_scores(torch.nn.Identity()) == {}
