"""python -m pipelines.convert_slide: round trip, metadata, refusal to overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ats_wsi.io import MissingResolutionError, open_slide
from ats_wsi.io.synthetic import halve
from pipelines.convert_slide import main


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_round_trip_svs(cmu_svs: Path, tmp_path: Path, ngff: str) -> None:
    dst = tmp_path / "cmu.zarr"
    assert main([str(cmu_svs), str(dst), "--chunk", "512", "--levels", "3", "--ngff", ngff]) == 0
    if ngff == "0.5":
        meta = json.loads((dst / "zarr.json").read_text())["attributes"]["ome"]
        assert meta["version"] == "0.5"
        assert json.loads((dst / "0" / "zarr.json").read_text())["dimension_names"] == [
            "c",
            "y",
            "x",
        ]
    else:
        meta = json.loads((dst / ".zattrs").read_text())
        assert meta["multiscales"][0]["version"] == "0.4"
    datasets = meta["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"][1:] for d in datasets] == [
        pytest.approx([0.499 * 2**k] * 2) for k in range(3)
    ]
    with open_slide(cmu_svs) as src, open_slide(dst) as z:
        assert z.dimensions == src.dimensions and z.mpp == pytest.approx(src.mpp)
        assert z.level_dimensions == ((2220, 2967), (1110, 1483), (555, 741))
        level0 = src.read_region((0, 0), 0, src.dimensions)  # small slide: fine in a test
        np.testing.assert_array_equal(z.read_region((0, 0), 0, z.dimensions), level0)
        np.testing.assert_array_equal(z.read_region((0, 0), 1, (1110, 1483)), halve(level0))


def test_refuses_to_overwrite_and_converts_without_mpp(
    cmu_svs: Path, make_pyramid, tmp_path: Path, capsys
) -> None:
    dst = tmp_path / "out.zarr"
    assert main([str(cmu_svs), str(dst), "--levels", "1"]) == 0
    assert main([str(cmu_svs), str(dst), "--levels", "1"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([str(cmu_svs), str(dst), "--levels", "1", "--overwrite"]) == 0
    # A pyramid without any resolution converts in pixel units...
    nores = make_pyramid("nores.tif", shape=(300, 400), mpp=None)
    assert main([str(nores), str(tmp_path / "px.zarr")]) == 0
    assert "pixel units" in capsys.readouterr().out
    meta = json.loads((tmp_path / "px.zarr" / "zarr.json").read_text())["attributes"]["ome"]
    axes = meta["multiscales"][0]["axes"]
    assert all("unit" not in a for a in axes)
    with pytest.raises(MissingResolutionError, match="px.zarr"):
        open_slide(tmp_path / "px.zarr")  # ...which a reader then asks an mpp for
    with open_slide(tmp_path / "px.zarr", mpp=0.5) as z, open_slide(nores, mpp=0.5) as src:
        np.testing.assert_array_equal(
            z.read_region((0, 0), 0, (400, 300)), src.read_region((0, 0), 0, (400, 300))
        )
    # ...and --mpp fills in a missing resolution but does not replace one, unless overridden.
    assert main([str(nores), str(tmp_path / "n.zarr"), "--mpp", "0.25"]) == 0
    with open_slide(tmp_path / "n.zarr") as z:
        assert z.mpp == (0.25, 0.25)
    assert main([str(cmu_svs), str(tmp_path / "m.zarr"), "--levels", "1", "--mpp", "2"]) == 0
    with open_slide(tmp_path / "m.zarr") as z:
        assert z.mpp == pytest.approx((0.499, 0.499))
    argv = [str(cmu_svs), str(tmp_path / "o.zarr"), "--levels", "1", "--mpp", "2"]
    assert main([*argv, "--mpp-override"]) == 0
    with open_slide(tmp_path / "o.zarr") as z:
        assert z.mpp == (2.0, 2.0)
