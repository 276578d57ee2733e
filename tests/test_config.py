"""Behaviour of orpo/config.py: recipes, command-line overrides, checks and train.py's front door."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orpo.config import TrainConfig, coerce, parse_args, read_recipe
from orpo.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))
FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_recipe_key_names_key_file_line_and_closest_key(tmp_path):
    recipe = write_recipe(tmp_path, "base_model: openai/whisper-tiny\n# a comment\n\nlearning_rat: 1e-4\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        read_recipe(recipe)
    message = str(err.value)
    assert "'learning_rat'" in message
    assert f"{recipe}:4" in message
    assert "'learning_rate'" in message


def test_unknown_recipe_key_via_parse_args(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 1\nper_device_train_batch_sise: 2\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(recipe)])
    message = str(err.value)
    assert f"{recipe}:2" in message
    assert "'per_device_train_batch_sise'" in message
    assert "'per_device_train_batch_size'" in message


@pytest.mark.parametrize(
    "argv", [["--learning_rat", "1e-4"], ["--learning_rat=1e-4"], ["--seed", "3", "--learning_rat", "1e-4"]]
)
def test_unknown_command_line_key_names_key_and_closest_key(argv):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    message = str(err.value)
    assert "command line" in message
    assert "'learning_rat'" in message
    assert "'learning_rate'" in message


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError) as err:
        parse_args(["--zzqqxx", "1"])
    message = str(err.value)
    assert "'zzqqxx'" in message and "command line" in message
    assert "Did you mean" not in message
    assert "--help" in message


def test_stray_positional_argument_is_an_error():
    with pytest.raises(ConfigError, match="command line"):
        parse_args(["recipes/demo.yaml"])


# ---------------------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    "line, key",
    [
        ("per_device_train_batch_size: four", "per_device_train_batch_size"),
        ("per_device_train_batch_size: 2.5", "per_device_train_batch_size"),
        ("alpha: [1]", "alpha"),
        ("alpha: true", "alpha"),
        ("gradient_checkpointing: maybe", "gradient_checkpointing"),
        ("seed: null", "seed"),
        ("task: [transcribe]", "task"),
        ("lora_target_modules: {q_proj: 1}", "lora_target_modules"),
        ("lora_target_modules: [q_proj, 3]", "lora_target_modules"),
    ],
)
def test_wrong_type_in_recipe_names_key_and_file_line(tmp_path, line, key):
    recipe = write_recipe(tmp_path, f"seed: 1\n{line}\n")
    with pytest.raises(ConfigError) as err:
        read_recipe(recipe)
    message = str(err.value)
    assert f"'{key}'" in message
    assert f"{recipe}:2" in message


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--per_device_train_batch_size", "four"], "per_device_train_batch_size"),
        (["--gradient_checkpointing", "maybe"], "gradient_checkpointing"),
        (["--learning_rate", "fast"], "learning_rate"),
        (["--seed", "none"], "seed"),
    ],
)
def test_wrong_type_on_command_line_names_key(argv, key):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    message = str(err.value)
    assert f"'{key}'" in message
    assert "command line" in message


def test_scientific_learning_rate_read_as_string_by_yaml_is_a_float(tmp_path):
    assert yaml.safe_load("learning_rate: 1e-5") == {"learning_rate": "1e-5"}  # the PyYAML quirk under test
    recipe = write_recipe(tmp_path, "learning_rate: 1e-5\nadam_epsilon: 1e-7\n")
    values = read_recipe(recipe)
    assert values["learning_rate"] == 1e-5 and type(values["learning_rate"]) is float
    assert values["adam_epsilon"] == 1e-7 and type(values["adam_epsilon"]) is float
    cfg = parse_args(["--config", str(recipe)])
    assert cfg.learning_rate == 1e-5 and type(cfg.learning_rate) is float


def test_recipe_values_get_declared_types(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "num_train_epochs: 3\nmax_steps: 100.0\ngradient_checkpointing: yes\ntimestamps: 'off'\nbase_model: 123\n",
    )
    values = read_recipe(recipe)
    assert values == {
        "num_train_epochs": 3.0,
        "max_steps": 100,
        "gradient_checkpointing": True,
        "timestamps": False,
        "base_model": "123",
    }
    assert type(values["num_train_epochs"]) is float
    assert type(values["max_steps"]) is int


@pytest.mark.parametrize(
    "raw, expected", [("true", True), ("False", False), ("yes", True), ("0", False), ("on", True), ("off", False)]
)
def test_command_line_booleans(raw, expected):
    assert parse_args(["--gradient_checkpointing", raw]).gradient_checkpointing is expected


def test_coerce_reports_where_the_value_came_from():
    with pytest.raises(ConfigError, match=r"^somewhere:7: key 'lora_r' expects an integer"):
        coerce("lora_r", "x", "somewhere:7")


# ---------------------------------------------------------------------------------------------------------
# Precedence, lists, None


def test_defaults_then_recipe_then_command_line(tmp_path):
    recipe = write_recipe(tmp_path, "learning_rate: 3e-5\nseed: 7\nwarmup_steps: 50\n")
    cfg = parse_args(["--config", str(recipe), "--learning_rate", "1e-4", "--peft", "lora"])
    assert cfg.learning_rate == 1e-4  # command line beats the recipe
    assert cfg.seed == 7 and cfg.warmup_steps == 50  # recipe beats the defaults
    assert cfg.peft == "lora"  # command line beats the default
    assert cfg.weight_decay == 0.0 and cfg.per_device_train_batch_size == 4  # untouched defaults
    assert cfg.base_model == "openai/whisper-small"


def test_command_line_wins_whatever_the_order(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 7\n")
    assert parse_args(["--seed", "11", "--config", str(recipe)]).seed == 11
    assert parse_args(["--seed=12", "--config", str(recipe)]).seed == 12


def test_no_arguments_gives_defaults():
    cfg = parse_args([])
    assert cfg.learning_rate == 1e-5 and cfg.task == "transcribe" and cfg.language is None
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def test_list_defaults_are_not_shared_between_configs():
    a, b = TrainConfig(), TrainConfig()
    a.report_to.append("wandb")
    assert b.report_to == ["tensorboard"]


def test_list_keys_from_command_line_and_recipe(tmp_path):
    cfg = parse_args(["--lora_target_modules", "q_proj,v_proj", "--report_to", "wandb"])
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.report_to == ["wandb"]
    assert parse_args(["--lora_target_modules", "q_proj, v_proj ,fc1"]).lora_target_modules == [
        "q_proj",
        "v_proj",
        "fc1",
    ]
    recipe = write_recipe(tmp_path, "lora_target_modules: [fc1, fc2]\nreport_to: []\n")
    cfg = parse_args(["--config", str(recipe)])
    assert cfg.lora_target_modules == ["fc1", "fc2"]
    assert cfg.report_to == []


def test_none_for_optional_keys(tmp_path):
    recipe = write_recipe(tmp_path, "language: zh\ntest_data: null\nresume_from_checkpoint: latest\n")
    cfg = parse_args(["--config", str(recipe)])
    assert cfg.language == "zh" and cfg.test_data is None and cfg.resume_from_checkpoint == "latest"
    cfg = parse_args(["--config", str(recipe), "--language", "none", "--resume_from_checkpoint", "None"])
    assert cfg.language is None and cfg.resume_from_checkpoint is None
    assert parse_args(["--train_data", "null"]).train_data is None


# ---------------------------------------------------------------------------------------------------------
# Choices and ranges


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--peft", "qlora"], "peft"),
        (["--task", "transcribee"], "task"),
        (["--mixed_precision", "fp32"], "mixed_precision"),
        (["--lr_scheduler_type", "exponential"], "lr_scheduler_type"),
    ],
)
def test_choices_are_enforced(argv, key):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert key in str(err.value)
    assert repr(argv[1]) in str(err.value)


def test_choices_accept_valid_values(tmp_path):
    cfg = parse_args(
        ["--peft", "adalora", "--task", "translate", "--mixed_precision", "bf16", "--lr_scheduler_type", "cosine"]
    )
    assert (cfg.peft, cfg.task, cfg.mixed_precision, cfg.lr_scheduler_type) == (
        "adalora",
        "translate",
        "bf16",
        "cosine",
    )
    recipe = write_recipe(tmp_path, "peft: qlora\n")
    with pytest.raises(ConfigError, match="peft"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--per_device_eval_batch_size", "-1"], "per_device_eval_batch_size"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--lora_r", "0"], "lora_r"),
        (["--warmup_steps", "-5"], "warmup_steps"),
        (["--alpha=-0.1"], "alpha"),
        (["--min_audio_len=-1"], "min_audio_len"),
        (["--max_audio_len", "1", "--min_audio_len", "2"], "max_audio_len"),
        (["--max_audio_len", "5", "--min_audio_len", "5"], "max_audio_len"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs"),
    ],
)
def test_range_checks(argv, key):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert key in str(err.value)


def test_range_edges_that_are_allowed():
    cfg = parse_args(
        [
            "--per_device_train_batch_size",
            "1",
            "--min_audio_len",
            "0",
            "--max_audio_len",
            "0.1",
            "--alpha",
            "0",
            "--max_steps",
            "10",
            "--num_train_epochs",
            "0",
        ]
    )
    assert (cfg.per_device_train_batch_size, cfg.min_audio_len, cfg.max_audio_len) == (1, 0.0, 0.1)
    assert cfg.max_steps == 10


def test_range_checks_apply_to_recipes(tmp_path):
    recipe = write_recipe(tmp_path, "per_device_train_batch_size: 0\n")
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        parse_args(["--config", str(recipe)])
    # ... and a good command-line value rescues a bad recipe value, since checks run on the merged config
    assert parse_args(["--config", str(recipe), "--per_device_train_batch_size", "2"]).per_device_train_batch_size == 2


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        read_recipe(write_recipe(tmp_path, "- seed\n- 3\n", "list.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(write_recipe(tmp_path, "seed: [1,\n", "broken.yaml"))
    assert read_recipe(write_recipe(tmp_path, "# only a comment\n", "empty.yaml")) == {}


# ---------------------------------------------------------------------------------------------------------
# Shipped recipes


def test_recipes_are_shipped():
    names = [p.relative_to(ROOT).as_posix() for p in RECIPES]
    assert names, "no recipes/**/*.yaml found"
    assert "recipes/demo.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.relative_to(ROOT).as_posix() for p in RECIPES])
def test_shipped_recipe_is_valid(recipe, tmp_path, monkeypatch):
    values = read_recipe(recipe)
    cfg = TrainConfig(**values)
    for key, value in values.items():
        assert getattr(cfg, key) == value
    monkeypatch.chdir(tmp_path)  # the recipe's model folder, as `whisper-orpo fetch-model` would leave it
    (tmp_path / cfg.base_model).mkdir(parents=True)
    assert parse_args(["--config", str(recipe)]) == cfg


# ---------------------------------------------------------------------------------------------------------
# train.py as a program


@pytest.fixture(scope="module")
def train_py(tmp_path_factory):
    """`train.py --help` and `train.py --config <bad recipe>`, run side by side (each imports torch)."""
    folder = tmp_path_factory.mktemp("train_py")
    out_dir = folder / "out"
    recipe = write_recipe(
        folder, f"base_model: {folder / 'no-such-model'}\noutput_dir: {out_dir}\nseed: 1\nlearning_rat: 1e-4\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100", PYTHONUNBUFFERED="1")
    procs = {
        "help": subprocess.Popen(
            [sys.executable, "train.py", "--help"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
        "bad_key": subprocess.Popen(
            [sys.executable, "train.py", "--config", str(recipe)],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    return {"results": results, "recipe": recipe, "out_dir": out_dir, "model": folder / "no-such-model"}


def test_train_py_help_lists_every_key_with_its_help(train_py):
    rc, stdout, stderr = train_py["results"]["help"]
    assert rc == 0, stderr
    squashed = re.sub(r"\s+", "", stdout)
    missing = []
    for f in dataclasses.fields(TrainConfig):
        if not re.search(rf"--{f.name}\b", stdout) or re.sub(r"\s+", "", f.metadata["help"]) not in squashed:
            missing.append(f.name)
    assert not missing, f"--help lacks these keys or their help: {missing}"
    assert "--config" in stdout
    assert len(FIELD_NAMES) > 30


def test_train_py_unknown_key_exits_2_before_loading_anything(train_py):
    rc, stdout, stderr = train_py["results"]["bad_key"]
    recipe = train_py["recipe"]
    assert rc == 2, (stdout, stderr)
    assert "'learning_rat'" in stderr and f"{recipe}:4" in stderr and "'learning_rate'" in stderr
    assert "Traceback" not in stderr
    assert "no-such-model" not in stderr.replace(str(recipe), "")  # no attempt to load the model was reported
    assert not train_py["out_dir"].exists()  # training never started


def test_range_and_choice_errors_name_where_the_value_came_from(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 1\npeft: qlora\n")
    with pytest.raises(ConfigError, match=re.escape(f"{recipe}: peft must be one of")):
        parse_args(["--config", str(recipe)])
    with pytest.raises(
        ConfigError, match="^command line \\(--per_device_train_batch_size\\): per_device_train_batch_size must be >= 1"
    ):
        parse_args(["--config", str(recipe), "--peft", "lora", "--per_device_train_batch_size", "0"])


def test_key_set_twice_in_a_recipe_is_an_error(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 1\nalpha: 0.1\nseed: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{recipe}:3: key 'seed' is set twice (first on line 1)")):
        read_recipe(recipe)


def test_yaml_boolean_for_a_string_key_says_to_quote_it(tmp_path):
    recipe = write_recipe(tmp_path, "language: no\n")
    with pytest.raises(ConfigError, match="quote the value"):
        read_recipe(recipe)
    assert read_recipe(write_recipe(tmp_path, "language: 'no'\n", name="quoted.yaml")) == {"language": "no"}


KEY_TABLE_PAGE = ROOT / "docs" / "configuration.md"  # the recipe-key table; the README links it
KEY_ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| `([^`]*)` \| (.+) \|$")


def documented_type(annotation: str) -> str:
    """``Optional[int]`` -> ``int``, ``list[str]`` -> ``list``: the type column of the key table."""
    inner = re.fullmatch(r"Optional\[(.+)\]", annotation)
    name = inner.group(1) if inner else annotation
    return name.split("[")[0]


def documented_default(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return ", ".join(value) if isinstance(value, list) else str(value)


def test_docs_document_every_key_with_its_type_and_default():
    assert "(docs/configuration.md" in (ROOT / "README.md").read_text(), "the README no longer links the key table"
    rows = {}
    for line in KEY_TABLE_PAGE.read_text().splitlines():
        match = KEY_ROW.match(line)
        if match:
            rows[match.group(1)] = match.groups()[1:3]
    missing = [name for name in FIELD_NAMES if name not in rows]
    assert not missing, f"the recipe-key table in {KEY_TABLE_PAGE.relative_to(ROOT)} lacks {missing}"
    unknown = sorted(set(rows) - set(FIELD_NAMES))
    assert not unknown, f"the recipe-key table documents keys TrainConfig does not have: {unknown}"
    for field in dataclasses.fields(TrainConfig):
        expected = (documented_type(str(field.type)), documented_default(field))
        assert rows[field.name] == expected, (
            f"{KEY_TABLE_PAGE.relative_to(ROOT)}: `{field.name}` row says type/default {rows[field.name]}, "
            f"TrainConfig has {expected}"
        )
