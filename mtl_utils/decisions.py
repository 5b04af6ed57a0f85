"""Which freezing, when: the series' advice as a small decision tree, each answer citing a measured number.

The tree is data: questions with answers, leaves with the way of training to choose and why. The reasons are
templates; `fill` puts in the numbers the notebooks measured (notebook 08 computes them from their tables),
and refuses a chart whose numbers are missing.
"""

from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    """A leaf: the way of training to choose, and why (a sentence with {fields} for measured numbers)."""

    choose: str
    why: str


@dataclass(frozen=True)
class Question:
    """A question and, for each answer, the next question or the advice."""

    ask: str
    answers: tuple[tuple[str, Question | Advice], ...]


Node = Question | Advice

CHART = Question(
    "Has today's data drifted from the data the model was trained on? (a domain classifier, notebook 03b)", (
        ("yes", Question("Do you have labels for today's data?", (
            ("no", Advice("freeze everything, and get labels",
                          "on drifted sources the frozen head lost {drift_loss_min:.0f} to {drift_loss_max:.0f} points, "
                          "and its own confidence did not warn (it fell by less, or rose)")),
            ("yes", Advice("retrain the head on them, backbone frozen",
                           "{remedy_n:,} labelled sentences of each source won back {remedy_min:+.1f} to "
                           "{remedy_max:+.1f} points (mean of 3 seeds, on test sentences never trained on), in seconds")),
        ))),
        ("no", Question("Must a task get better?", (
            ("no", Advice("freeze everything",
                          "the classifier cannot tell two halves of one source apart ({control_domain:.2f}), and the "
                          "frozen model keeps its test accuracy ({frozen_trec:.1%} / {frozen_movies:.1%})")),
            ("yes", Question("Must the other task's answers stay exactly as validated?", (
                ("yes", Advice("give that task its own copy of the layers it trains",
                               "B's own layers gained {own_gain:+.1f} validation points over B's control (3 seeds, from "
                               "{own_min:+.1f}) and changed none of A's answers; layers shared with A changed up to "
                               "{moving_changed:.0%} of them, A's head frozen or not")),
                ("no", Question("Labelled sentences per task: at least {a_from:,} (question type{a_note}) or "
                                "{b_from:,} (sentiment), where the learning curve pays on every seed?", (
                    ("yes", Advice("unfreeze the top 2 layers",
                                   "from there every seed beat its same-data control on validation: question type "
                                   "{a_gain:+.1f} points at {a_from:,}, sentiment {b_gain:+.1f} at {b_from:,}; an epoch "
                                   "costs {layers_epoch:.0f} s against {heads_epoch:.1f} s for the heads alone")),
                    ("no", Question("Can you afford {mpnet_slower:.0f}x slower encoding for accuracy?", (
                        ("yes", Advice("all-mpnet-base-v2, frozen: train the heads",
                                       "on 1,000 sentences per task its heads beat all-MiniLM-L6-v2's by {mpnet_A:+.1f} "
                                       "(question type) and {mpnet_B:+.1f} (sentiment) validation points")),
                        ("no", Advice("all-MiniLM-L6-v2, frozen: train the heads",
                                      "below those sizes unfreezing did not pay on every seed (sentiment at "
                                      "{b_below:,}: {b_below_min:+.1f} to {b_below_max:+.1f} points)")),
                    ))),
                ))),
            ))),
        ))),
    ))


def leaves(node: Node) -> list[Advice]:
    """Every advice in the tree, left to right."""
    if isinstance(node, Advice):
        return [node]
    return [leaf for _, child in node.answers for leaf in leaves(child)]


def _texts(node: Node) -> list[str]:
    if isinstance(node, Advice):
        return [node.choose, node.why]
    return [node.ask, *(text for answer, child in node.answers for text in (answer, *_texts(child)))]


def fields(node: Node) -> set[str]:
    """The measured numbers the tree needs (in its reasons, and in thresholds of its questions and answers)."""
    return {name for text in _texts(node) for _, name, _, _ in string.Formatter().parse(text) if name}


def fill(node: Node, facts: dict[str, object]) -> Node:
    """The same tree with every number filled in from `facts`; missing numbers are a clear error."""
    missing = sorted(fields(node) - set(facts))
    if missing:
        raise KeyError(f"the decision chart needs the measured numbers {missing}; compute them first")
    if isinstance(node, Advice):
        return Advice(node.choose.format(**facts), node.why.format(**facts))
    return Question(node.ask.format(**facts),
                    tuple((answer.format(**facts), fill(child, facts)) for answer, child in node.answers))


def as_markdown(node: Node, depth: int = 0) -> str:
    """The tree as a nested Markdown list: "answer → next question", or "answer → **advice**, because reason"."""
    if isinstance(node, Advice):
        return f"**{node.choose}**, because {node.why}"
    lines = [f"**{node.ask}**"] if depth == 0 else []
    for answer, child in node.answers:
        step = f"**{child.choose}**, because {child.why}" if isinstance(child, Advice) else child.ask
        lines.append(f"{'  ' * depth}- *{answer}* → {step}")
        if isinstance(child, Question):
            lines.append(as_markdown(child, depth + 1))
    return "\n".join(lines)


WHEN = {  # family of scenarios -> when to choose it (the table in notebook 08 shows it beside the numbers)
    "freeze everything": "serving only, or today's data still looks like the training data",
    "classic baseline": "no pre-trained model allowed, or a quick reference to beat",
    "freeze backbone": "the default: cheap, the other task untouched, the backbone's embeddings kept",
    "freeze one head": "one task must improve while another's accuracy must hold (its answers will move)",
    "a task's own layers": "one task must improve while another's answers must stay exactly as validated",
    "last k layers": "labelled data in the thousands and compute for the top layers",
    "gradual unfreezing": "fresh heads on a small dataset (what it protects against); rarely needed from trained heads",
    "LoRA": "many tasks on one backbone, small checkpoints; not faster on a CPU",
    "another backbone": "accuracy matters more than encoding speed",
}
