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
    for action in parser._actions:
        if action.help and action.help != "==SUPPRESS==":
            assert action.option_strings == [] or any(o in out for o in action.option_strings)
            if action.default not in (None, False, "==SUPPRESS==") and action.option_strings and "--help" not in action.option_strings:
                assert "default" in out, f"{command} {action.option_strings} does not show its default"


@pytest.mark.parametrize("args", [["--size", "32x32"], ["--seed", "-1"], ["--n-val", "-2"]])
def test_synth_bad_arguments_are_one_line_errors(tmp_path, capsys, args):
    assert main(["synth", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("corte-ray synth: error:") and "\n" not in err
