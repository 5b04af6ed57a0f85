"""Which freezing, when: the series' advice as a small decision tree, each answer citing a measured number.

The tree is data: questions with answers, leaves with the way of training to choose and why. The reasons are
templates; `fill` puts in the numbers the notebooks measured (notebook 08 computes them from their tables),
and refuses a chart whose numbers are missing.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace


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
    "Has today's data drifted from the data the model was trained on? (a domain classifier, notebook 03)", (
        ("no", Advice("freeze everything",
                      "the classifier cannot tell two halves of one source apart ({control_domain:.2f}), and the frozen "
                      "model keeps its test accuracy ({frozen_trec:.1%} / {frozen_movies:.1%})")),
        ("yes", Question("Do you have labels for today's data?", (
            ("no", Advice("freeze everything, and get labels",
                          "on drifted sources the frozen head lost {drift_loss_min:.0f} to {drift_loss_max:.0f} points, "
                          "and its own confidence did not warn (it fell by less, or rose)")),
            ("yes", Question("Must the other task stay exactly as it is?", (
                ("yes", Advice("freeze the backbone and the other head",
                               "with the backbone frozen, {frozen_changed:.0%} of the other task's predictions change; "
                               "with it moving, up to {moving_changed:.0%}")),
                ("no", Question("What compute do you have?", (
                    ("a CPU, minutes", Advice("freeze the backbone, train the heads",
                                              "an epoch on cached embeddings takes {heads_epoch:.1f} s against "
                                              "{layers_epoch:.0f} s with the top layers training")),
                    ("a CPU for hours, or a GPU", Question("How much labelled data per task?", (
                        ("about a thousand", Advice("LoRA, or the heads only",
                                                    "on 1,000 sentences per task LoRA changed Task A by {lora_A:+.1f} "
                                                    "and Task B by {lora_B:+.1f} points against its control; "
                                                    "unfreezing layers cost Task B up to {layers_B_worst:.1f}")),
                        ("thousands", Advice("unfreeze the last k layers",
                                             "on all the training data the last {best_k} layers gained {big_data_A:+.1f} "
                                             "(Task A) and {big_data_B:+.1f} (Task B) points over the same-data control")),
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


def fields(node: Node) -> set[str]:
    """The measured numbers the tree's reasons need."""
    return {name for leaf in leaves(node) for _, name, _, _ in string.Formatter().parse(leaf.why) if name}


def fill(node: Node, facts: dict[str, object]) -> Node:
    """The same tree with every reason's numbers filled in from `facts`; missing numbers are a clear error."""
    missing = sorted(fields(node) - set(facts))
    if missing:
        raise KeyError(f"the decision chart needs the measured numbers {missing}; compute them first")
    if isinstance(node, Advice):
        return replace(node, why=node.why.format(**facts))
    return replace(node, answers=tuple((answer, fill(child, facts)) for answer, child in node.answers))


WHEN = {  # family of scenarios -> when to choose it (the table in notebook 08 shows it beside the numbers)
    "freeze everything": "serving only, or today's data still looks like the training data",
    "classic baseline": "no pre-trained model allowed, or a quick reference to beat",
    "freeze backbone": "the default: cheap, the other task untouched, the backbone's embeddings kept",
    "freeze one head": "one task must improve while another must stay as validated",
    "last k layers": "labelled data in the thousands and compute for the top layers",
    "gradual unfreezing": "fresh heads on a small dataset (what it protects against); rarely needed from trained heads",
    "LoRA": "many tasks on one backbone, small checkpoints; not faster on a CPU",
    "another backbone": "accuracy matters more than encoding speed",
}
