"""Sparsing Law fitter: recovers the published coefficients; CLI on workdirs' metrics.jsonl."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fit_laws", ROOT / "experiments" / "fit_laws.py")
fit_laws = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_laws)


def test_selftest_recovers_published_coefficients_all_scales_both_forms(tmp_path):
    # tolerances (module docstring): truth within 4 sigma for A0 and alpha, curve within 1%, SiLU A0 2% / alpha 20%,
    # ReLU A0 10%; 0.5% noise, 200 points on D in [5, 250] B tokens
    assert fit_laws.selftest(seed=0, out=tmp_path / "s.png", verbose=False) == []
    assert (tmp_path / "s_relu.png").exists() and (tmp_path / "s_silu.png").exists()
    assert fit_laws.selftest(seed=7, verbose=False) == []


def test_silu_fit_is_tight_at_larger_scales():
    D, A, (c, alpha, a0) = fit_laws.sample_published("silu", "0.8B", seed=3)
    fit = fit_laws.fit_silu_law(D, A)
    assert fit["params"]["A0"] == pytest.approx(a0, rel=0.01)
    assert fit["params"]["alpha"] == pytest.approx(alpha, rel=0.10)
    assert set(fit["stderr"]) == {"c", "alpha", "A0"} and all(v > 0 for v in fit["stderr"].values())


def test_noise_free_fit_is_exact():
    D = np.geomspace(5, 250, 50)
    A = fit_laws.relu_law(D, 0.079, 0.683, -3.46, 0.069)
    p = fit_laws.fit_relu_law(D, A)["params"]
    np.testing.assert_allclose([p["c"], p["alpha"], p["b"], p["A0"]], [0.079, 0.683, -3.46, 0.069], rtol=1e-4)


def _workdir(tmp_path, name, form, scale, seed):
    D, A, _ = fit_laws.sample_published(form, scale, n=80, seed=seed)
    wd = tmp_path / name
    wd.mkdir()
    rows = [{"kind": "train", "step": i + 1, "tokens_seen": float(d * 1e9), "sparsity": float(1 - a)}
            for i, (d, a) in enumerate(zip(D, A, strict=True))]
    rows.insert(3, {"kind": "eval", "step": 3, "eval_loss": 1.0})
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return wd


def test_cli_fits_several_workdirs_and_plots(tmp_path, capsys):
    wds = [_workdir(tmp_path, "a", "silu", "0.4B", 1), _workdir(tmp_path, "b", "silu", "1.2B", 2)]
    rc = fit_laws.main(["--form=silu", f"--out={tmp_path / 'f.png'}", *map(str, wds)])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "f.png").stat().st_size > 0
    assert out.count("A0 = ") == 2 and "±" in out
    D, A = fit_laws.load_run(wds[0])
    assert len(D) == 80 and D.min() == pytest.approx(5.0)


def test_cli_errors(tmp_path, capsys):
    assert fit_laws.main([f"--out={tmp_path / 'f.png'}", str(tmp_path)]) != 0
    assert "--form" in capsys.readouterr().err
    assert fit_laws.main(["--form=relu", f"--out={tmp_path / 'f.png'}", str(tmp_path / "missing")]) == 1
    with pytest.raises(ValueError, match="points"):
        fit_laws.fit_silu_law([1.0, 2.0], [0.3, 0.35])
