"""Judged win rate against reference outputs, AlpacaEval style, for `datagen eval --benchmark judged:FILE`.

FILE is any file `datagen finetune` reads (Alpaca JSON such as AlpacaEval's own set, chat or
prompt/completion JSONL, task JSONL): the last assistant turn of each example is the reference,
the turns before it the instruction. Each student answers greedily; the teacher judges every
student reply against the reference twice, once in each order (eval's pairwise judge,
`templates/judge_pairwise.jinja`), so a judge that favours a position scores a tie: a win
counts 1, a tie 0.5, a loss 0, and unreadable verdicts are counted and left out.

Beside the raw win rate, a length-controlled one in the manner of AlpacaEval 2's
(Dubois et al., 2024, "Length-Controlled AlpacaEval"): a logistic GLM of the preference on
tanh(standardised character-length difference) plus a constant, and the win rate predicted
with the length term at zero. Simplified from theirs, which it cannot copy offline: no
instruction-difficulty term (theirs is precomputed over the 805 AlpacaEval instructions and
the leaderboard's models) and no regularisation towards its "gamed" verbose/concise baselines;
their L1 penalty with the strength chosen by 5-fold cross-validation is a small fixed L2
penalty here. Every judgement is one row (both orders, the same length difference), with
its soft label (tie 0.5), as their duplicated-row fit of a soft preference does. Without the
instruction term the prediction is one number: sigmoid(constant).

    lc = length_controlled_win_rate(points, student_lengths, reference_lengths)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

L2_PENALTY = 0.01  # keeps the fit finite when every verdict goes one way (raw 0 or 1)
JUDGE_TEMPLATE = "judge_pairwise.jinja"
"""The pairwise judge's prompt: eval's tuned-over-base win rate and this benchmark ask it the same way."""


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge reply (text, or JSON asked for with VERDICT_SCHEMA);
    None when it names none."""
    from datagen.structured import json_field, looks_like_json

    if looks_like_json(text):
        value = json_field(text, "verdict")
        if isinstance(value, str) and value.strip().lower() in ("a", "b", "tie"):
            word = value.strip().lower()
            return "tie" if word == "tie" else word.upper()
    match = re.search(r"verdict\s*[:=]?\s*\**\s*(tie|a|b)\b", text, flags=re.IGNORECASE)
    if match is None:
        match = re.match(r"\s*(tie|a|b)\b", text, flags=re.IGNORECASE)
    if match is None:
        return None
    word = match.group(1).lower()
    return "tie" if word == "tie" else word.upper()


def judge_messages(request: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    from datagen.prompts import load_template

    text = load_template(JUDGE_TEMPLATE).render(request=request, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "user", "content": text}]


def load_reference_file(path: str | Path, limit: int | None = None) -> list[tuple[str, list[dict], str]]:
    """(request text, chat prompt, reference) for each example of `path`."""
    from datagen.finetune.data import load_conversations

    rows = []
    for conversation in load_conversations(path)[:limit]:
        prompt = conversation.chat()[:-1]
        request = "\n\n".join(m["content"] for m in prompt if m["role"] == "user")
        rows.append((request, prompt, conversation.messages[-1][1]))
    return rows


def _logistic(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_soft_logistic(features: np.ndarray, targets: np.ndarray, penalty: float = L2_PENALTY,
                      steps: int = 100) -> np.ndarray:
    """Coefficients minimising the soft-label log loss (targets in [0, 1]) plus penalty/2 * |w|^2,
    by Newton's method (the objective is strictly convex, so it converges from zero)."""
    weights = np.zeros(features.shape[1])
    for _ in range(steps):
        p = _logistic(features @ weights)
        gradient = features.T @ (p - targets) + penalty * weights
        hessian = (features * (p * (1 - p))[:, None]).T @ features + penalty * np.eye(features.shape[1])
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return weights


def length_features(student_lengths: Sequence[int], reference_lengths: Sequence[int]) -> np.ndarray:
    """AlpacaEval's tanh(delta_len / std(delta_len)); zero when the differences do not vary."""
    delta = np.asarray(student_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)
    spread = delta.std(ddof=1) if len(delta) > 1 else 0.0
    return np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)


def length_controlled_win_rate(points: Sequence[float], student_lengths: Sequence[int],
                               reference_lengths: Sequence[int]) -> dict[str, float] | None:
    """The win rate with the length difference held at zero, and the fitted length coefficient.

    `points[i]` is one judgement (1 win, 0.5 tie, 0 loss) of a reply whose length is
    `student_lengths[i]` against a reference of `reference_lengths[i]` characters.
    """
    if not points:
        return None
    targets = np.asarray(points, dtype=float)
    length = length_features(student_lengths, reference_lengths)
    features = np.column_stack([np.ones_like(targets), length])
    constant, length_weight = fit_soft_logistic(features, targets)
    return {"lc_win_rate": round(float(_logistic(np.asarray(constant))), 4),
            "length_coefficient": round(float(length_weight), 4)}


def is_extreme_change(raw: float, controlled: float, absolute: float = 0.10, relative: float = 4.0) -> bool:
    """AlpacaEval's warning that the GLM may have failed (rates here in [0, 1])."""
    too_small = controlled < min(raw - raw / relative, raw - absolute)
    too_large = controlled > max(raw + (1 - raw) / relative, raw + absolute)
    return too_small or too_large


def judged_points(teacher, requests: Sequence[str], replies: Sequence[str], references: Sequence[str],
                  sampling) -> list[tuple[int, float | None]]:
    """(example index, points) for every judgement of reply vs reference in both orders;
    None for an unreadable verdict."""
    from datagen.structured import VERDICT_SCHEMA

    conversations = []
    for request, reply, reference in zip(requests, replies, references):
        conversations.append(judge_messages(request, reply, reference))  # the student is A
        conversations.append(judge_messages(request, reference, reply))  # the student is B
    results = []
    for position, [answer] in enumerate(teacher.complete(conversations, sampling, schema=VERDICT_SCHEMA)):
        verdict = parse_verdict(answer.text) if answer.ok else None
        student = "A" if position % 2 == 0 else "B"
        score = None if verdict is None else 0.5 if verdict == "tie" else float(verdict == student)
        results.append((position // 2, score))
    return results


def judged_summary(judgements: Sequence[tuple[int, float | None]], replies: Sequence[str],
                   references: Sequence[str]) -> dict[str, Any]:
    """Raw and length-controlled win rate over the reference, with wins, ties and losses."""
    readable = [(index, score) for index, score in judgements if score is not None]
    points = [score for _, score in readable]
    summary: dict[str, Any] = {
        "win_rate": round(sum(points) / len(points), 4) if points else None,
        "wins": sum(score == 1.0 for score in points), "ties": sum(score == 0.5 for score in points),
        "losses": sum(score == 0.0 for score in points), "unreadable": len(judgements) - len(readable),
        "mean_length": round(sum(map(len, replies)) / max(len(replies), 1), 1),
    }
    controlled = length_controlled_win_rate(points, [len(replies[i]) for i, _ in readable],
                                            [len(references[i]) for i, _ in readable])
    summary.update(controlled or {"lc_win_rate": None, "length_coefficient": None})
    return summary


_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([mb])(?![a-z])", re.IGNORECASE)


def parameter_count(model: str) -> float | None:
    """Parameters as a model's name states them ("SmolLM2-135M-Instruct", "Llama-3.1-8B"), else None."""
    sizes = [float(number) * (1e6 if unit.lower() == "m" else 1e9)
             for number, unit in _SIZE.findall(Path(model).name.replace("_", "-"))]
    return max(sizes) if sizes else None


def judge_warnings(judge_model: str, base: str, tuned: str) -> list[str]:
    """Why the judge's verdicts may say little: it is the student's base, or it is no bigger."""
    from datagen.model_paths import resolve_model

    def same(a: str, b: str) -> bool:
        try:
            return a == b or resolve_model(a) == resolve_model(b)
        except Exception:  # an API model name is not a local path; only equal names match then
            return False

    if same(judge_model, base) or same(judge_model, tuned):
        return [f"the judge ({judge_model}) is the student's own base model: it grades answers no better "
                "than it writes them, so these win rates say little"]
    judge_size, student_size = parameter_count(judge_model), parameter_count(base)
    if judge_size is not None and student_size is not None and judge_size <= student_size:
        return [f"the judge ({judge_model}, {judge_size / 1e9:g}B parameters) is no larger than the student "
                f"({base}, {student_size / 1e9:g}B): use a much stronger judge for win rates that mean something"]
    return []
