import json

import pytest

from maskgil.demo import main
from maskgil.training import cpu_compile_available

COMPILE = pytest.param(["--compile"], id="compiled", marks=pytest.mark.skipif(
    not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU"))


@pytest.mark.parametrize("extra", [pytest.param([], id="eager"), COMPILE])
def test_demo_runs_all_three_samplers(capsys, extra):
    main(["--batch", "2", "--steps", "4", "--fusion-steps", "2", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert set(report) == {"mar-4", "ar-64", "fusion-k32-m2"}
    assert all(v["seconds"] > 0 for v in report.values())
    # same seed: fusion's first row starts with the AR row's prefix
    ar_row = next(l for l in out if l.strip().startswith("ar-64"))
    fu_row = next(l for l in out if l.strip().startswith("fusion"))
    assert ar_row.split("first row:")[1] == fu_row.split("first row:")[1]
