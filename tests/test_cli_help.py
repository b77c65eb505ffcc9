"""`diffalign --help` answers from the command table alone: no torch, transformers or reward zoo imported."""

import subprocess
import sys

from diffalign import cli


def test_top_level_help_imports_nothing_heavy():
    code = ("import sys; from diffalign import cli; cli.main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'tyro', 'diffalign.rewards') "
            "if m in sys.modules]; print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout
    assert done.stderr == ""  # no library warnings
    for command in cli.COMMANDS:
        assert command.name in done.stdout


def test_commands_are_dispatched_by_their_words(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("config show", "", lambda args: seen.append(("show", args))),
                                          cli.Command("config", "", lambda args: seen.append(("config", args)))])
    cli.main(["config", "show", "--epochs", "2"])
    cli.main(["config", "other"])
    assert seen == [("show", ["--epochs", "2"]), ("config", ["other"])]


def test_the_console_script_exits_zero_when_a_command_returns_a_value(monkeypatch):
    # console scripts call sys.exit(main()): a command returning a path must not become exit status 1
    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("make", "", lambda args: "runs/somewhere")])
    assert cli.main(["make"]) is None
    assert cli.run(["make"]) == "runs/somewhere"
