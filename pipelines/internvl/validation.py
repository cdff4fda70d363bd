"""Scores of the training model on held-out questions at a sample round (issue 29): the validation loss (answer
tokens' cross-entropy, as training's, weighted by answer tokens across batches) and exact match / token F1 of the
greedy answers (pipelines/internvl/data.py's SQuAD-style metrics)."""

from __future__ import annotations

from typing import Sequence

import torch

from .data import QASample, exact_match, token_f1
from .inputs import IGNORE, ChatPacker, collate, generate_answer, to_device

VALIDATION_ITEMS = 64  # held-out questions scored per round at most (the first ones): each answer is a generation


@torch.no_grad()
def held_out_scores(model: torch.nn.Module, packer: ChatPacker, samples: Sequence[QASample],
                    encoded: list[dict[str, torch.Tensor]], batch_size: int, max_new_tokens: int,
                    device: torch.device) -> dict[str, float]:
    """{"validation_loss", "exact_match", "token_f1"} of `model` on `samples` (their packed inputs `encoded`),
    forwards of at most `batch_size` samples; {} without samples."""
    if not samples:
        return {}
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = to_device(collate(encoded[start:start + batch_size], packer.tokenizer.pad_token_id), device)
        answer_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss's mean runs over these
        total += float(model(**batch).loss.float()) * answer_tokens
        tokens += answer_tokens
    answers = [generate_answer(model, packer, sample, max_new_tokens, device) for sample in samples]
    return {"validation_loss": total / max(tokens, 1),
            "exact_match": sum(exact_match(a, s.answer) for a, s in zip(answers, samples)) / len(samples),
            "token_f1": sum(token_f1(a, s.answer) for a, s in zip(answers, samples)) / len(samples)}
