"""`corte-ray --help` and every sub-command's --help explain their options and show defaults."""

from __future__ import annotations

import pytest

from corte_ray.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: corte-ray {command}")
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    assert "(default: None)" not in out
    for action in parser._actions:
        if action.help and action.help != "==SUPPRESS==":
            assert action.option_strings == [] or any(o in out for o in action.option_strings)


def _options():
    for command in COMMANDS:
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        for action in parser._actions:
            if action.option_strings and action.nargs != 0:   # options that take a value (not on/off flags)
                yield pytest.param(command, action.dest, id=f"{command}-{action.option_strings[0]}")


@pytest.mark.parametrize("command, dest", list(_options()))
def test_every_option_shows_its_own_default(command, dest):
    """Each option's own help block says its default (or that it is required): not merely somewhere on the
    page, and never the "None" that only means "not given here"."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in parser._actions if a.dest == dest)
    block = " ".join(parser._get_formatter()._format_action(action).split())
    assert "(required)" in block or "default" in block, block
    assert "None" not in block, block
    if action.default is not None and not action.required and "%(default)" not in action.help \
            and "default" not in action.help:
        shown = "x".join(map(str, action.default)) if isinstance(action.default, tuple) else str(action.default)
        assert f"(default: {shown})" in block or f"default: {action.default}" in block, block


def test_config_flags_show_the_config_default():
    from corte_ray.cli import build_parser as bp

    label = bp()._subparsers._group_actions[0].choices["label"]
    text = " ".join(label.format_help().split())
    assert "(blackbox.timeout, default: 30.0)" in text and "(data.train_split, default: train)" in text
    assert "(blackbox.answer, default: probs)" in text


@pytest.mark.parametrize("args", [["--size", "32x32"], ["--seed", "-1"], ["--n-val", "-2"]])
def test_synth_bad_arguments_are_one_line_errors(tmp_path, capsys, args):
    assert main(["synth", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("corte-ray synth: error:") and "\n" not in err
