"""Property-based fuzzing (hypothesis) of the two inputs users write by hand: recipes and `essa score`
rows. Whatever the input, the command succeeds or prints one `error:` line and exits 2; it never
raises (a traceback) and never hangs. Examples are derandomized so CI sees the same inputs every run;
their number keeps the file to about a minute here."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from essa import recipe as recipes
from essa.cli import main
from tests.conftest import _toml

pytestmark = pytest.mark.hostile

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 2, -1, 2**32, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=20), st.sampled_from(["", "gsm8k", "ifeval", "math", "countdown", "x:y", "a.py:f", "\0", "../"]),
)
plausible = st.one_of(st.integers(min_value=0, max_value=10), st.floats(min_value=0, max_value=2),
                      st.sampled_from(["q_proj", ["q_proj", "v_proj"], "countdown", "ifeval-generated", "cma", "es",
                                       "nf4", "cpu", "float32", True, False]))
values = plausible | st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text("abc_", min_size=1, max_size=5),
                                                                        inner, max_size=3)), max_leaves=6)
keys = st.sampled_from(recipes.all_keys() + ["run.nope", "nope.key"])


def toml_value(value) -> str:
    """TOML text for any generated value (inf and nan included); a string hypothesis makes that TOML
    cannot hold comes out as invalid TOML, which is one more input to reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return _toml(value)


def check_cli(capsys, argv: list[str]) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        lines = err.strip().splitlines()
        assert code == 2 and lines and lines[-1].startswith("error: "), err
        assert sum(line.startswith("error:") for line in lines) == 1, err


@FUZZ
@given(changes=st.dictionaries(keys, values, max_size=3))
def test_any_recipe_is_checked_or_rejected_in_one_line(tiny_model_dir, tmp_path, capsys, changes):
    sections = {"model": {"name_or_path": str(tiny_model_dir)}, "lora": {"rank": 2},
                "data": {"train_size": 16, "heldout_size": 4}, "generation": {"max_new_tokens": 4}}
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    path = tmp_path / "fuzz.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())
                            for name, body in sections.items()))
    check_cli(capsys, ["recipe", "check", str(path)])


@FUZZ
@given(content=st.binary(max_size=200))
def test_any_bytes_as_a_recipe(tmp_path, capsys, content):
    path = tmp_path / "bytes.toml"
    path.write_bytes(content)
    check_cli(capsys, ["recipe", "check", str(path)])


json_values = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
                           | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8)
good_row = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30), "response": st.text(max_size=60) | st.sampled_from(
        ["#### 42", "\\boxed{2^2^2^2^2}", "<answer>" * 50, "<answer>(1 + 2) * 3</answer>", "9" * 5000]),
     "answer": json_values | st.sampled_from(["#### 42", "42", 42, "\\frac{1}{2}"]),
     "numbers": json_values | st.just([1, 2, 3]), "target": json_values | st.just(9),
     "instructions": json_values | st.just([{"type": "lowercase"}])},
    optional={"extra": json_values})
bad_row = st.dictionaries(st.sampled_from(["prompt", "response", "answer"]), json_values, max_size=3) | json_values
# Mostly well-formed files, so that most examples reach the reward process; some with a bad row.
rows = st.lists(good_row, min_size=1, max_size=4) | st.lists(good_row | bad_row, max_size=4)


@FUZZ
@given(reward=st.sampled_from(["gsm8k", "math", "countdown", "conciseness", "format-instructions"]),
       lines=rows)
def test_any_rows_are_scored_or_rejected_in_one_line(tmp_path, capsys, reward, lines):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)  # hypothesis runs every example in the same tmp_path
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    check_cli(capsys, ["score", "--reward", reward, "--timeout-s", "10", "--input", str(source),
                       "--output", str(out)])
    if out.exists():
        scored = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(scored) == len(lines) and all(isinstance(r["reward"], float) for r in scored)


@pytest.fixture(autouse=True)
def _no_rich_width(monkeypatch):
    """Errors must be one line whatever the terminal width."""
    monkeypatch.setenv("COLUMNS", "60")


def test_toml_value_round_trips():
    import tomllib

    for value in ([1, [2.5, "x"]], {"a": {"b": True}}, float("inf")):
        parsed = tomllib.loads(f"v = {toml_value(value)}")["v"]
        assert parsed == value or (isinstance(value, float) and math.isinf(parsed))
