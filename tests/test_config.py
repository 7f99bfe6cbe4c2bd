"""Every invalid setting is refused at construction with a message naming the argument and the fix."""

from pathlib import Path

import pytest

from relex_callback import RelexCallback, RelexConfig


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(observe=0, extrapolate_to=10), ValueError, r"^observe=0 must be >= 1\.$"),
        (dict(observe=2.5, extrapolate_to=10), TypeError, r"^observe must be an int, got float \(2\.5\)\.$"),
        (dict(observe=1, extrapolate_to=10), ValueError, r"gives 1 snapshots to fit, too few for rank=1 .* need at least 2"),
        (dict(observe=4, rank=4, extrapolate_to=10), ValueError, r"too few for rank=4 .* need at least 5\. Increase observe"),
        (dict(observe=10), ValueError, r"^extrapolate_to is required in halt mode: pass extrapolate_to='auto' \(the horizon the window supports\) or a target step K, e\.g\. RelexCallback\(observe=10, extrapolate_to=20\)\.$"),
        (dict(observe=10, extrapolate_to=[20, "auto"]), ValueError, r"^extrapolate_to=\[20, 'auto'\]: 'auto' picks the target itself"),
        (dict(observe=10, extrapolate_to="auto", mode="jump"), ValueError, r"^extrapolate_to='auto' is a halt-mode option"),
        (dict(observe=10, extrapolate_to="far"), TypeError, r"^extrapolate_to='far' must be an int, a non-empty list of ints or 'auto'"),
        (dict(observe=10, extrapolate_to=20, candidates=["trend", "line"]), ValueError, r"^candidates=\['trend', 'line'\] must be a non-empty list drawn from"),
        (dict(observe=10, mode="jump", candidates=["scale"]), ValueError, r"^candidates=\['scale'\] is a halt-mode option"),
        (dict(observe=10, extrapolate_to=10), ValueError, r"^extrapolate_to=10 is not after the observation window, which ends at step 10 \(start_step=0 \+ observe=10\)\. Pass a target > 10\.$"),
        (dict(observe=10, start_step=5, extrapolate_to=12), ValueError, r"ends at step 15 \(start_step=5"),
        (dict(observe=10, extrapolate_to=[20, 20]), ValueError, r"duplicate steps"),
        (dict(observe=10, extrapolate_to="100"), TypeError, r"extrapolate_to='100' must be an int, a non-empty list of ints or 'auto'"),
        (dict(observe=10, extrapolate_to=[20.5]), TypeError, r"extrapolate_to must contain ints"),
        (dict(observe=10, snapshot_every=3, extrapolate_to=50), ValueError, r"^observe=10 is not a multiple of snapshot_every=3: .* Use e\.g\. observe=9\.$"),
        (dict(observe=10, extrapolate_to=50, buffer_dtype="int8"), ValueError, r"^buffer_dtype='int8' is not supported; use one of \('bfloat16', 'float16', 'float32'\)\.$"),
        (dict(observe=10, extrapolate_to=50, buffer_device="tpu"), ValueError, r"^buffer_device='tpu' is not supported"),
        (dict(observe=10, extrapolate_to=50, mode="fly"), ValueError, r"^mode='fly' is not supported"),
        (dict(observe=10, extrapolate_to=50, fit="cubic"), ValueError, r"^fit='cubic' is not supported; use one of \('linear', 'power', 'poly2'\)\.$"),
        (dict(observe=10, extrapolate_to=50, power=0), ValueError, r"^power=0 must be a number > 0"),
        (dict(observe=10, extrapolate_to=50, shrink=1.5), ValueError, r"^shrink=1\.5 must be in \(0, 1\]"),
        (dict(observe=10, extrapolate_to=50, include="(["), ValueError, r"include pattern '\(\[' is not a valid regular expression"),
        (dict(observe=10, extrapolate_to=50, exclude=[3]), TypeError, r"exclude must be a list of regular-expression strings"),
        (dict(observe=10, extrapolate_to=50, overwrite="yes"), TypeError, r"^overwrite='yes' must be True or False\.$"),
        (dict(observe=10, extrapolate_to=50, window=1), ValueError, r"^window=1 must be >= 2\.$"),
        (dict(observe=10, extrapolate_to=50, buffer_max_bytes=0), ValueError, r"^buffer_max_bytes=0 must be >= 1\.$"),
        (dict(observe=10, extrapolate_to=50, backtest_tolerance=-1), ValueError, r"^backtest_tolerance=-1 must be a number > 0\.$"),
        (dict(observe=10, extrapolate_to="auto", max_horizon=10), ValueError, r"^max_horizon=10 is not beyond the observation window, which ends at step 10: .* max_horizon=100"),
        (dict(observe=10, start_step=5, extrapolate_to="auto", max_horizon=12), ValueError, r"^max_horizon=12 is not beyond the observation window, which ends at step 15.*max_horizon=105"),
        (dict(observe=10, extrapolate_to="auto", max_horizon=80.0), TypeError, r"^max_horizon must be an int, got float \(80\.0\)\.$"),
        (dict(observe=10, extrapolate_to="auto", max_horizon="far"), TypeError, r"^max_horizon must be an int, got str"),
        (dict(observe=10, extrapolate_to=50, max_horizon=80), ValueError, r"^max_horizon=80 caps the reward-guided search of extrapolate_to='auto'"),
        (dict(observe=10, extrapolate_to="auto", probe_margin=-0.1), ValueError, r"^probe_margin=-0\.1 must be a number >= 0"),
        (dict(observe=10, extrapolate_to="auto", probe_margin=float("nan")), ValueError, r"^probe_margin=nan must be a number >= 0"),
    ],
)
def test_invalid_settings_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        RelexConfig(**kwargs)
    with pytest.raises(error, match=message):
        RelexCallback(**kwargs)


def test_unknown_option_in_dict_is_named():
    with pytest.raises(TypeError, match=r"unknown RelexConfig option\(s\) \['obsreve'\]"):
        RelexCallback({"obsreve": 10, "extrapolate_to": 50})


def test_config_round_trips_and_derives_the_snapshot_steps():
    config = RelexConfig(observe=12, snapshot_every=4, start_step=3, extrapolate_to=100, include="attn")
    assert config.snapshot_steps == [7, 11, 15]
    assert config.last_observed_step == 15
    assert config.include == ["attn"]
    assert config.extrapolate_to == [100]
    assert RelexConfig.from_dict(config.to_dict()) == config
    callback = RelexCallback(config.to_dict(), observe=24, extrapolate_to=[200])
    assert callback.config.observe == 24 and callback.config.snapshot_every == 4
    assert RelexCallback(**callback.state()["args"]).config == callback.config


def test_output_dir_under_a_file_is_refused_at_construction(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    for bad, where in ((tmp_path / "notes.txt" / "run", "is under"), (tmp_path / "notes.txt", "is a file")):
        for make in (RelexConfig, RelexCallback):
            with pytest.raises(NotADirectoryError, match=rf"^output_dir='{bad}' {where}.*Choose an output_dir in a folder"):
                make(observe=4, extrapolate_to=8, output_dir=bad)
    assert not (tmp_path / "fresh").exists()
    config = RelexConfig(observe=4, extrapolate_to=8, output_dir=tmp_path / "fresh" / "run")  # missing folders are fine
    assert config.output_dir == str(tmp_path / "fresh" / "run") and not (tmp_path / "fresh").exists()  # nothing created


def test_output_dir_accepts_any_path_like(tmp_path):
    class Custom:  # os.PathLike by protocol, not a pathlib path
        def __fspath__(self):
            return str(tmp_path / "custom")

    for value in (tmp_path / "out", Custom(), str(tmp_path / "out")):
        callback = RelexCallback(observe=4, extrapolate_to=8, output_dir=value)
        assert isinstance(callback.config.output_dir, str)  # JSON-friendly for trainer_state.json
        assert RelexConfig.from_dict(callback.config.to_dict()) == callback.config
    with pytest.raises(TypeError, match=r"^output_dir must be a str or os.PathLike path, got int\.$"):
        RelexConfig(observe=4, extrapolate_to=8, output_dir=3)
    assert Path(RelexConfig(observe=4, extrapolate_to=8, output_dir=Custom()).output_dir) == tmp_path / "custom"
