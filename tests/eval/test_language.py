"""lm-eval tasks built on the offline benchmark data: an evaluated item is never among its own few-shot
examples (the few-shot pool is the evaluated split itself)."""

from __future__ import annotations

import pytest

from crystal_lm.eval.language import build_tasks


def _solved(task, doc) -> str:
    """The item written the way lm-eval writes a few-shot example: question, delimiter, gold answer."""
    text, choices = task.doc_to_text(doc), task.doc_to_choice(doc)
    target = task.doc_to_target(doc)
    if task.multiple_input:  # WinoGrande: the text is the index of the gold choice, the target the rest
        return f"{choices[text]}{task.config.target_delimiter}{target}"
    answer = choices[target] if isinstance(target, int) else target
    return f"{text}{task.config.target_delimiter}{answer}"


# Shots and items such that, drawn from the whole split, items would meet themselves (ARC: 25 of 299 items
# for 60 items, WinoGrande likewise). HellaSwag's split is 10,042 items: a leak is unlikely in a test of
# affordable size, so it checks the same mechanism cheaply (300-shot prompts cost 17 s to build).
@pytest.mark.parametrize(
    ("name", "shots", "n"), [("arc_challenge", 25, 60), ("hellaswag", 50, 20), ("winogrande", 60, 60)]
)
def test_an_item_is_never_its_own_few_shot_example(name, shots, n):
    (task,), _ = build_tasks([name], {name: shots})
    task.build_all_requests(limit=n)
    assert len({id(i.doc) for i in task.instances}) == n
    for inst in task.instances:
        context = inst.args[0]
        assert context.count("\n\n") >= shots  # the examples are there
        assert _solved(task, inst.doc) not in context, (name, inst.doc_id)
