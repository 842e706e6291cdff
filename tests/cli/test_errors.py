"""Bad input stops with one line that names the option or file and what to do."""

from __future__ import annotations

import pytest

from tests.conftest import fit_args


def _error_line(capsys, args: list[str]) -> str:
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lifelong: error:")]
    assert len(err) == 1, err
    return err[0]


def test_unknown_method(capsys, tmp_path):
    line = _error_line(capsys, fit_args("classification/er_splitdigits.yaml", tmp_path, "--model", "Nope"))
    assert "unknown class_path 'Nope'" in line and "lightning_modules.ER" in line


def test_misspelled_option(capsys, tmp_path):
    args = fit_args("classification/er_splitdigits.yaml", tmp_path, "--model.init_args.buffer_sise", "3")
    assert "'buffer_sise' is not accepted" in _error_line(capsys, args)


def test_missing_config_key(capsys, tmp_path):
    config = tmp_path / "no_data.yaml"
    config.write_text("model:\n  class_path: lightning_modules.ER\n")
    assert "fit.data" in _error_line(capsys, ["fit", "-c", str(config)])


def test_classes_that_do_not_split(capsys, tmp_path):
    args = fit_args("classification/er_splitdigits.yaml", tmp_path, "--data.init_args.num_tasks", "4")
    assert "data.num_tasks=4" in _error_line(capsys, args)


def test_checkpoint_from_a_different_task_count(run_fit, capsys, tmp_path):
    run_fit("classification/finetune_splitdigits.yaml", tmp_path, "--task_switch.steps_per_task", "2")
    args = fit_args(
        "classification/finetune_splitdigits.yaml",
        tmp_path,
        "--data.init_args.num_tasks",
        "2",
        "--task_switch.steps_per_task",
        "2",
        "--ckpt_path",
        "last",
    )
    line = _error_line(capsys, args)
    assert "other settings: data.init_args.num_tasks (checkpoint 5, config 2)" in line
    # Accepting the change reaches the module's own check: a stream of another length cannot be resumed.
    line = _error_line(capsys, [*args, "--allow_changes", "[data.init_args.num_tasks]"])
    assert "5 tasks" in line and "has 2" in line and "data.num_tasks" in line
