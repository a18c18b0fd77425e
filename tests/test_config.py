"""Config loading: defaults, YAML, overrides, and one clear error per mistake."""
import re
import subprocess
import sys

import pytest

from fastmath.config import Config, help_text, load_config
from fastmath.errors import ConfigError
from tests.conftest import REPO, subprocess_env


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: x\nsft:\n  lr: 1.0e-4\n  epochs: 3\n")
    config = load_config(path, ["sft.epochs=5", "data.overlong=truncate", "run.stages=[sft]", "sft.lr=2e-5"])
    assert isinstance(config, Config)
    assert config.run.name == "x"
    assert config.sft.epochs == 5
    assert config.sft.lr == 2e-5  # YAML 1.1 reads 2e-5 as a string; it must still become a float
    assert config.data.overlong == "truncate"
    assert config.run.stages == ["sft"]
    assert config.model.name_or_path == "embedded"


@pytest.mark.parametrize("text, overrides, message", [
    ("sft:\n  lrr: 1\n", [], "unknown config key 'sft.lrr'"),
    ("sftt:\n  lr: 1\n", [], "unknown config key 'sftt'"),
    ("sft:\n  epochs: three\n", [], "config key 'sft.epochs' expects int"),
    ("sft:\n  epochs: 2.5\n", [], "config key 'sft.epochs' expects int"),
    ("model:\n  compile: 1\n", [], "config key 'model.compile' expects bool"),
    ("", ["data.overlong=cut"], "config key 'data.overlong': 'cut' is not one of"),
    ("", ["sft.epochs=0"], "config key 'sft.epochs' must be > 0"),
    ("", ["sft"], "must look like key.sub=value"),
    ("", ["sft.lr.x=1"], "config key 'sft.lr' expects float"),
    ("", ["run.name=y", "run.name.x=1"], "'name' is not a section"),
    ("", ["data.max_length=9000", "sft.tokens_per_micro_batch=4096"], "exceeds 'sft.tokens_per_micro_batch'"),
    ("sft: 3\n", [], "'sft' must be a mapping"),
    ("[1, 2]\n", [], "must hold a mapping"),
    ("sft: {lr: [\n", [], "is not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_help_lists_every_field():
    text = help_text()
    for key in ("run.output_dir", "sft.tokens_per_micro_batch", "data.overlong", "model.name_or_path",
                "heldout.num_problems", "optim.grad_clip", "checkpoint.keep"):
        assert key in text


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_cli_config_typo_is_one_line_error(tmp_path):
    """The entry point turns a user mistake into one line and exit status 2, no traceback."""
    result = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), "--config",
                             str(REPO / "configs" / "demo.yaml"), "sft.epoch=3"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastmath: error: unknown config key 'sft.epoch'; did you mean 'sft.epochs'? (known in this section: "
        + result.stderr.split("known in this section: ")[1].strip()]
    assert "Traceback" not in result.stderr


def test_cli_help_lists_fields():
    result = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), "--help"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0
    assert "sft.global_batch" in result.stdout


def test_readme_config_reference_matches_the_code():
    from fastmath.config import reference_markdown

    assert reference_markdown() in (REPO / "docs/config.md").read_text(encoding="utf-8"), \
        "docs/config.md's config reference is stale: paste fastmath.config.reference_markdown() into it"


@pytest.mark.parametrize("old, new", [("sft.keep_checkpoints", "checkpoint.keep"), ("sft.adam_beta2", "optim.adam_beta2"),
                                      ("grpo.eval_num_problems", "heldout.num_problems"),
                                      ("eval.max_new_tokens", "heldout.max_new_tokens"),
                                      ("sft.loss_chunk_size", "model.lm_head_chunk_mib"),
                                      ("grpo.beta", "grpo.loss.beta"),
                                      ("grpo.num_generations", "grpo.rollout.num_generations"),
                                      ("grpo.reward_weights", "grpo.reward.reward_weights")])
def test_old_key_names_its_new_key(tmp_path, old, new):
    section, name = old.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: 1\n")
    for source, overrides in ((path, []), (None, [f"{old}=1"])):
        with pytest.raises(ConfigError, match=f"config key '{old}' was renamed to '{new}'"):
            load_config(source, overrides)


def test_every_key_of_the_flat_grpo_section_names_its_sub_section():
    """The keys that moved when grpo split into rollout / reward / loss each give one error naming the new key,
    and every key of a sub-section has such a note (none was dropped on the way)."""
    import dataclasses

    from fastmath.config import RENAMED, GRPOConfig

    moved = {f"grpo.{part}.{f.name}" for part in ("rollout", "reward", "loss")
             for f in dataclasses.fields(getattr(GRPOConfig(), part))}
    assert moved == {new for old, new in RENAMED.items() if old.startswith("grpo.") and new.count(".") == 2}
    with pytest.raises(ConfigError, match=r"^config key 'grpo.beta' was renamed to 'grpo.loss.beta'$"):
        load_config(None, ["grpo.loss.epsilon_high=0.28", "grpo.beta=0.1"])
    with pytest.raises(ConfigError, match=r"^config key 'grpo.temperature' was renamed to 'grpo.rollout.temperature'"):
        load_config(None, ["grpo={temperature: 0.7}"])


@pytest.mark.parametrize("text, overrides, expected", [
    ("grpo:\n  lr: 2.0e-6\n  loss:\n    beta: 0.1\n", ["grpo.loss={epsilon_high: 0.28}"],
     {"grpo.lr": 2e-6, "grpo.loss.beta": 0.1, "grpo.loss.epsilon_high": 0.28}),
    ("grpo:\n  loss:\n    beta: 0.1\n    epsilon_high: 0.28\n", ["grpo.loss:={beta: 0.2}"],
     {"grpo.loss.beta": 0.2, "grpo.loss.epsilon_high": 0.2}),
    ("grpo:\n  rollout:\n", ["grpo.rollout.top_k=5"], {"grpo.rollout.top_k": 5}),
    (None, ["grpo={lr: 3.0e-6, loss: {beta: 0.3}}", "grpo.loss.num_iterations=2"],
     {"grpo.lr": 3e-6, "grpo.loss.beta": 0.3, "grpo.loss.num_iterations": 2}),
])
def test_sub_section_overrides_merge_like_sections(tmp_path, text, overrides, expected):
    from fastmath.config import setting

    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    config = load_config(path, overrides)
    for key, value in expected.items():
        assert setting(config, key) == value, key


def test_a_resumed_run_reads_a_checkpoint_config_saved_before_the_grpo_split():
    from fastmath.config import saved_setting

    flat = {"grpo": {"num_generations": 4, "lr": 1e-6}}
    assert saved_setting(flat, "grpo.rollout.num_generations") == 4
    assert saved_setting({"grpo": {"rollout": {"num_generations": 6}}}, "grpo.rollout.num_generations") == 6
    with pytest.raises(KeyError):
        saved_setting(flat, "grpo.loss.beta")


def test_a_renamed_key_whose_unit_changed_says_so():
    with pytest.raises(ConfigError, match="rows per chunk became a logits budget in MiB"):
        load_config(None, ["sft.loss_chunk_size=1024"])


def test_stage_overrides_of_shared_settings_are_optional():
    config = load_config(None, ["optim.grad_clip=0.5", "grpo.grad_clip=2.0", "checkpoint.save_every=7"])
    assert (config.sft.grad_clip, config.grpo.grad_clip, config.optim.grad_clip) == (None, 2.0, 0.5)
    assert config.sft.save_every is None and config.checkpoint.save_every == 7


def _numeric_keys() -> set[str]:
    """Every config field whose type is int or float, alone, optional, or as the items of a list."""
    import typing

    from fastmath.config import leaf_defaults

    return {key for key, _, hint, _ in leaf_defaults() if ({hint} | set(typing.get_args(hint))) & {int, float}}


def _ranged_fields() -> dict:
    from fastmath.config import leaf_defaults

    return {key: f for key, f, _, _ in leaf_defaults() if f.metadata.get("range") or f.metadata.get("why")}


def test_every_numeric_field_has_a_range():
    """Every numeric field declares its range (`finite` where any finite value means something), and no other
    field has one or a reason for one."""
    numeric, ranged = _numeric_keys(), _ranged_fields()
    assert numeric - set(ranged) == set(), "numeric fields declared without range=... in fastmath/config.py"
    assert set(ranged) - numeric == set(), "a range or a why on a field that holds no number"
    assert all(f.metadata["range"] for f in ranged.values()), "a why= without a range="


def test_a_malformed_range_fails_where_the_field_is_declared():
    from fastmath.config import _opt

    with pytest.raises(ValueError, match="not a range: '0..1'"):
        _opt(0.5, "A fraction.", range="0..1")


@pytest.mark.parametrize("text, inside, outside", [
    ("[0, 1)", [0.0, 0.5, 0.999], [-1e-9, 1.0, float("nan")]),
    ("(0, 1]", [1e-9, 1.0], [0.0, 1.0001]),
    ("> 0", [1e-300, 5.0], [0.0, -1.0, float("inf")]),
    (">= 2", [2, 3], [1, 1.999]),
])
def test_interval_bounds(text, inside, outside):
    from fastmath.config_ranges import Interval

    interval = Interval.parse(text)
    assert all(v in interval for v in inside)
    assert not any(v in interval for v in outside)


def _outside(interval, is_int: bool) -> list:
    """Values just outside an interval's finite ends (the end itself where it is open)."""
    step = 1 if is_int else 0.5
    values = [interval.low - step if interval.low_closed else interval.low]
    if interval.high != float("inf"):
        values.append(interval.high + step if interval.high_closed else interval.high)
    return [int(v) if is_int else v for v in values]


def test_every_range_is_enforced_at_its_bounds():
    """Each declared range refuses the values just outside it, naming the key and the range."""
    import typing

    from fastmath.config import leaf_defaults

    for key, f, hint, _ in leaf_defaults():
        interval = f.metadata.get("range")
        if interval is None or interval.text == "finite":  # no finite bound; NaN and inf: the test below
            continue
        is_int = int in ({hint} | set(typing.get_args(hint)))
        for value in _outside(interval, is_int):
            text = f"[{value}]" if typing.get_origin(hint) is list else str(value)
            with pytest.raises(ConfigError, match=rf"config key '{key}(\[0\])?' must be .*{re.escape(interval.text)}"):
                load_config(None, [f"{key}={text}"])


def test_signed_values_take_any_finite_number_but_not_inf():
    config = load_config(None, ["grpo.reward.cosine_wrong=[-5.0, 3.0]", "grpo.reward.reward_weights=[-1, 2]",
                                "grpo.reward.rewards=[accuracy, format]"])
    assert config.grpo.reward.cosine_wrong == [-5.0, 3.0]
    with pytest.raises(ConfigError, match=r"config key 'grpo.reward.cosine_correct\[1\]' must be a finite number"):
        load_config(None, ["grpo.reward.cosine_correct=[1.0, .inf]"])


def test_str_fields_take_the_override_text_as_written():
    config = load_config(None, ["run.name=007", "data.system_prompt=Answer: briefly", "run.output_dir='x y'"])
    assert config.run.name == "007"
    assert config.data.system_prompt == "Answer: briefly"
    assert config.run.output_dir == "x y"
    assert load_config(None, ["run.stages=[sft, eval]"]).run.stages == ["sft", "eval"]
