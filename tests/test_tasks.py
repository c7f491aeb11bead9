"""Tasks as plugins: each task module holds what essa knows of its task, and generic modules ask the
tasks instead of naming them."""

import re
from pathlib import Path

from essa.rewards import GENERATORS, REGISTRY, TASKS, judging, task_named

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = ("format-instructions", "ifeval", "gsm8k", "math", "countdown", "conciseness", "ifeval-generated")


def test_every_task_module_registers_its_reward_and_generator():
    assert set(REGISTRY) == {"conciseness", "countdown", "format-instructions", "gsm8k", "ifeval", "math"}
    assert {name: task.name for name, task in GENERATORS.items()} == {
        "format-instructions": "format-instructions", "countdown": "countdown", "ifeval-generated": "ifeval"}
    assert task_named("ifeval").extra == "ifeval" and task_named(["ifeval", "gsm8k"]) is None
    assert judging({"instruction_id_list": [], "kwargs": []}) is TASKS["ifeval"]
    assert judging({"answer": []}) is None


def test_generic_modules_never_name_a_task():
    # recipe.py holds the defaults a user sees (data.source and reward.name) and extras.py pyproject's extras
    # (one of which is called "ifeval"); every other module asks the tasks
    named = {}
    for path in (ROOT / "essa").rglob("*.py"):
        if path.name in ("recipe.py", "extras.py"):
            continue
        code = re.sub(r'"""(?s:.*?)"""|#.*', "", path.read_text())  # docstrings and comments may mention tasks
        hits = [name for name in TASK_NAMES if f'"{name}"' in code or f"'{name}'" in code]
        if hits:
            named[str(path.relative_to(ROOT))] = hits
    assert not named, f"generic modules name tasks: {named}"
