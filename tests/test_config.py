"""Config loading: defaults, YAML files, --set overrides, and one clear ConfigError per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

import clpd_ray
from clpd_ray.config import (
    Config,
    apply_overrides,
    default_cache_dir,
    load_config,
    save_config,
)
from clpd_ray.errors import ClpdError, ConfigError

DEMO = Path(clpd_ray.__file__).parent / "configs" / "demo.yaml"


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- valid configs --------------------------------------------------------------------------------


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.seed == 0
    assert [t.name for t in cfg.teachers.ladder] == ["t-small", "t-medium", "t-large"]
    assert cfg.curriculum.boundaries is None
    assert cfg.teachers.cache_dir is None


def test_demo_config_is_valid():
    cfg = load_config(DEMO)
    assert cfg.curriculum.num_stages == len(cfg.teachers.ladder) == 3


def test_demo_runs_the_published_ablation_config():
    # `clpd demo` is the clpd arm, seed 0, of the ablation in docs/results.md.
    # configs/ holds real files (a Ray working_dir zip turns a symlink into a text file), each a
    # byte-for-byte copy of the packaged demo config.
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("demo.yaml", "ablation.yaml"):
        assert not (root / name).is_symlink()
        assert (root / name).read_bytes() == DEMO.read_bytes(), f"configs/{name} != {DEMO}"


def test_load_from_yaml_file(tmp_path):
    path = _write(
        tmp_path,
        "seed: 7\n"
        "task: {max_difficulty: 4, train_size: 100}\n"
        "teachers:\n"
        "  ladder:\n"
        "    - {name: a, arch: llama, n_layer: 1, n_embd: 16, n_head: 2}\n"
        "    - {name: b, path: /some/model}\n"
        "distill: {loss: jsd, beta: 0.3}\n",
    )
    cfg = load_config(path)
    assert cfg.seed == 7
    assert (cfg.task.max_difficulty, cfg.task.train_size, cfg.task.eval_size) == (4, 100, 600)
    assert [t.name for t in cfg.teachers.ladder] == ["a", "b"]
    assert cfg.teachers.ladder[0].arch == "llama"
    assert cfg.teachers.ladder[1].path == "/some/model"
    assert (cfg.distill.loss, cfg.distill.beta) == ("jsd", 0.3)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["seed=3", "curriculum.boundaries=[1.5,3.5]", "student.arch=qwen2"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


# --- overrides ------------------------------------------------------------------------------------


def test_overrides_nested_lists_and_yaml_scalars():
    cfg = load_config(
        None,
        [
            "seed=5",
            "train.total_steps=10",
            "curriculum.boundaries=[1.5,3.5]",
            "student.lr=1e-3",
            "distill.scale_by_t2=true",
            "cluster.address=auto",
            "data.path=null",
            "scheduler.kwargs={window: 3}",
        ],
    )
    assert cfg.seed == 5
    assert cfg.train.total_steps == 10
    assert cfg.curriculum.boundaries == [1.5, 3.5]
    assert cfg.student.lr == pytest.approx(1e-3)
    assert cfg.distill.scale_by_t2 is True
    assert cfg.cluster.address == "auto"
    assert cfg.data.path is None
    assert cfg.scheduler.kwargs == {"window": 3}


def test_overrides_apply_on_top_of_file(tmp_path):
    path = _write(tmp_path, "train: {total_steps: 50, batch_size: 4}\n")
    cfg = load_config(path, ["train.total_steps=9"])
    assert (cfg.train.total_steps, cfg.train.batch_size) == (9, 4)


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"total_steps": 5}}
    out = apply_overrides(raw, ["train.total_steps=6", "task.max_difficulty=2"])
    assert raw == {"train": {"total_steps": 5}}
    assert out == {"train": {"total_steps": 6}, "task": {"max_difficulty": 2}}


def test_override_value_containing_equals_sign():
    assert apply_overrides({}, ["data.path=a=b"]) == {"data": {"path": "a=b"}}


def test_unparsable_override_value_is_kept_as_string():
    assert apply_overrides({}, ["data.path=[1,"]) == {"data": {"path": "[1,"}}


@pytest.mark.parametrize("item", ["seed", "=3", " =3"])
def test_override_without_key_value_raises(item):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [item])


def test_override_through_a_scalar_raises(tmp_path):
    path = _write(tmp_path, "seed: 3\n")
    with pytest.raises(ConfigError, match="seed is not a section"):
        load_config(path, ["seed.x=1"])


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("train.total_steps=abc", "train.total_steps", "'abc'"),
        ("train.total_steps=1.5", "train.total_steps", "1.5"),
        ("task.max_difficulty=[1]", "task.max_difficulty", "[1]"),
        ("distill.beta=1.5", "distill.beta", "1.5"),
        ("distill.alpha=1.0", "distill.alpha", "1.0"),
        ("distill.temperature=0", "distill.temperature", "0"),
        ("train.total_steps=0", "train.total_steps", "0"),
        ("distill.loss=kl", "distill.loss", "'kl'"),
        ("student.arch=bert", "student.arch", "'bert'"),
        ("curriculum.scorer=magic", "curriculum.scorer", "'magic'"),
    ],
)
def test_bad_value_names_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert f"bad value {value}" in msg
    assert isinstance(info.value, ClpdError)


def test_unknown_loss_lists_allowed_kinds():
    with pytest.raises(ConfigError, match="'kl'") as info:
        load_config(None, ["distill.loss=kl"])
    for kind in ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"):
        assert kind in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("foo=1", "'foo'"),
        ("distill.foo=1", "'distill.foo'"),
        ("train.totl_steps=3", "'train.totl_steps'"),
    ],
)
def test_unknown_key_raises(override, key):
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = _write(tmp_path, "teachers:\n  ladder:\n    - {name: a, n_layers: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'teachers\.ladder\.0\.n_layers'") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unparsable_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "seed: 0\ntask: a: b\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "line 2" in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_top_level_must_be_a_mapping_with_overrides(tmp_path):
    path = _write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, ["seed=1"])


def test_boolean_for_int_field_is_wrong_type():
    with pytest.raises(ConfigError, match=r"train\.total_steps"):
        load_config(None, ["train.total_steps=true"])


def test_duplicate_teacher_names_raise():
    with pytest.raises(ConfigError, match="unique") as info:
        load_config(None, ["teachers.ladder=[{name: a}, {name: b}, {name: a}]"])
    assert "teacher names" in str(info.value)
    assert "'a'" in str(info.value)


def test_empty_ladder_raises():
    with pytest.raises(ConfigError, match=r"teachers\.ladder"):
        load_config(None, ["teachers.ladder=[]"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["curriculum.boundaries=[1.5]"], "has 1 values; num_stages=3 needs 2"),
        (["curriculum.num_stages=2", "curriculum.boundaries=[1, 2]"], "needs 1"),
        (["curriculum.boundaries=[3.5,1.5]"], r"strictly increasing, got \[3.5, 1.5\]"),
        (["curriculum.boundaries=[2,2]"], "strictly increasing"),
    ],
)
def test_bad_boundaries_raise(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert "curriculum.boundaries" in str(info.value)


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="n_embd=30 must be divisible by n_head=4") as info:
        load_config(None, ["student.n_embd=30", "student.n_head=4"])
    assert "student" in str(info.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["distill.beta=2", "train.batch_size=0"])
    assert "distill.beta" in str(info.value) and "train.batch_size" in str(info.value)


# --- cache dir ------------------------------------------------------------------------------------


def test_default_cache_dir_prefers_config(monkeypatch, tmp_path):
    monkeypatch.setenv("CLPD_CACHE", str(tmp_path / "env"))
    cfg = load_config(None, [f"teachers.cache_dir={tmp_path / 'cfg'}"])
    assert default_cache_dir(cfg) == tmp_path / "cfg"


def test_default_cache_dir_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["teachers.cache_dir=~/teachers"])
    assert default_cache_dir(cfg) == tmp_path / "teachers"


def test_default_cache_dir_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLPD_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(Config()) == tmp_path / "env"
    assert default_cache_dir(None) == tmp_path / "env"


def test_default_cache_dir_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CLPD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir(Config()) == tmp_path / ".cache" / "clpd_ray"
    monkeypatch.setenv("CLPD_CACHE", "")  # empty means unset
    assert default_cache_dir(None) == tmp_path / ".cache" / "clpd_ray"


# --- what validation must refuse, because the run would ---------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_seeds_in_range_are_accepted(seed):
    assert load_config(None, [f"seed={seed}"]).seed == seed


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seeds_numpy_or_torch_refuse_are_refused_with_the_range(seed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"seed={seed}"])
    assert f"seed: {seed} is out of range; use an integer in [0, 4294967295]" in str(info.value)


@pytest.mark.parametrize("bounds", ["[.nan, .nan]", "[1.5, .inf]", "[-.inf, 2]"])
def test_boundaries_must_be_finite(bounds):
    with pytest.raises(ConfigError, match="not a finite number") as info:
        load_config(None, [f"curriculum.boundaries={bounds}"])
    assert "curriculum.boundaries" in str(info.value)


@pytest.mark.parametrize("name", ["t-small", "T1.v2_x", "7b", "a" * 64])
def test_teacher_names_that_are_safe_path_components_are_accepted(name):
    cfg = load_config(None, [f"teachers.ladder=[{{name: '{name}'}}]", "curriculum.num_stages=1"])
    assert cfg.teachers.ladder[0].name == name


@pytest.mark.parametrize(
    "name", ["../../../escaped-x", "..", ".", "a/b", "/abs", ".hidden", "-x", "has space", "a" * 65]
)
def test_teacher_names_that_could_leave_the_cache_are_refused(name):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"teachers.ladder=[{{name: '{name}'}}]", "curriculum.num_stages=1"])
    msg = str(info.value)
    assert f"teachers.ladder.0.name: teacher name {name!r} cannot be used" in msg
    assert "rename it" in msg


# --- strict YAML ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train:\n  total_steps: 5\nseed: 1\ntrain:\n  batch_size: 4\n", "'train'", "1 and 4"),
        ("train:\n  total_steps: 5\n  total_steps: 6\n", "'train.total_steps'", "2 and 3"),
        (
            "teachers:\n  ladder:\n    - {name: a, n_layer: 1, n_layer: 2}\n",
            "'teachers.ladder.0.n_layer'",
            "3 and 3",
        ),
    ],
)
def test_duplicated_keys_are_refused_naming_key_and_lines(tmp_path, text, key, lines):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: key {key} appears twice (lines {lines})")
    assert "merge them into one" in str(info.value)


def test_a_merge_key_may_be_overridden(tmp_path):
    text = (
        "teachers:\n  ladder:\n"
        "    - &t {name: a, n_layer: 1, n_embd: 16, n_head: 2}\n"
        "    - {<<: *t, name: b, n_embd: 24}\n"
    )
    ladder = load_config(_write(tmp_path, text)).teachers.ladder
    assert [(t.name, t.n_layer, t.n_embd) for t in ladder] == [("a", 1, 16), ("b", 1, 24)]


def test_duplicated_keys_in_a_set_value_are_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teachers.ladder=[{name: a, name: b}]"])
    assert str(info.value) == (
        "--set 'teachers.ladder=[{name: a, name: b}]': key 'teachers.ladder.0.name' is given "
        "twice; give it once"
    )


def test_a_config_that_is_not_utf8_is_named_with_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\n# réglages\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: not UTF-8 text: byte 0xe9 at byte position 11 (line 2, column 4) is not valid "
        "UTF-8; save the file as UTF-8"
    )


def test_utf8_with_or_without_a_byte_order_mark_is_read(tmp_path):
    for prefix in (b"", b"\xef\xbb\xbf"):
        path = tmp_path / "u.yaml"
        path.write_bytes(prefix + "# réglages ✓\nseed: 4\n".encode())
        assert load_config(path).seed == 4
