"""callbacks.DangerZone in a real fit: the zone of the training set is computed once, before the first step, logged at
step 0 and written like calmwild analyze's report; a resumed fit does not compute it again."""

import json

import pytest
from tiny import in_process_fit, only_run_dir, read_metrics

from calmwild.geometry.report import analyze_geometry
from calmwild.settings import GeometrySettings

GEOMETRY = {"num_levels": 12, "num_points": 16, "num_noises": 8, "num_queries": 32, "num_coverage_noises": 4,
            "num_pairs": 200, "num_threshold_points": 4}


@pytest.mark.slow
def test_the_danger_zone_is_computed_once_before_training(tmp_path, one_torch_thread, capsys):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}},
                 {"class_path": "callbacks.DangerZone", "init_args": {"geometry": GEOMETRY}}]
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 2, "trainer.callbacks": callbacks})
    run_dir = only_run_dir(tmp_path / "runs")
    record = json.loads((run_dir / "eval" / "danger_zone" / "step_0000000.json").read_text())
    datamodule = cli.datamodule
    expected = analyze_geometry(datamodule.train_images, datamodule.heldout_images, GeometrySettings(**GEOMETRY),
                                progress=False)
    assert record["geometry"]["danger_zone"] == expected["danger_zone"]  # the same numbers as calmwild analyze
    assert (run_dir / "eval" / "danger_zone" / "step_0000000.png").stat().st_size > 0
    zone = expected["danger_zone"]["sigma"]
    logged = {k: float(v) for row in read_metrics(run_dir) if int(row["step"]) == 0 for k, v in row.items()
              if k.startswith("zone/") and v}
    assert logged == ({} if zone is None else pytest.approx({"zone/sigma_low": zone[0], "zone/sigma_high": zone[1]}))
    said = capsys.readouterr().out
    assert "calmwild: step 0, danger_zone ..." in said and "danger_zone done in" in said

    in_process_fit(tmp_path, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                   **{"trainer.max_steps": 4, "trainer.callbacks": callbacks})
    history = json.loads((run_dir / "eval" / "danger_zone" / "history.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [0]  # not recomputed on resume
