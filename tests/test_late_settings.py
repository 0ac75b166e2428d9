"""Settings that used to pass the startup check and fail only after training or evaluation (or never finish):
each is refused at startup, naming the key and the valid range, and nothing is written (issue 18)."""
from __future__ import annotations

import pytest

from experiments.config import ConfigError
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)

IMAGEFOLDER = ["data=imagefolder", "data.root=/nonexistent"]


@pytest.mark.parametrize("overrides,message", [
    # integers beyond what numpy, scikit-learn or a C long take
    (["seed=4294967296"], r"seed=4294967296 must be in \[0, 4294967295\]"),
    (["data.split_seed=4294967296"], r"data\.split_seed=4294967296 must be in \[0, 4294967295\]"),
    (["train.batch_size=1099511627776"], r"train\.batch_size=1099511627776 must be in \[1, 65536\]"),
    (["eval.batch_size=9223372036854775807"], r"eval\.batch_size=9223372036854775807 must be in \[1, 65536\]"),
    (["threads=1000000000"], r"threads=1000000000 must be in \[1, 1024\]"),
    (["num_workers=100000"], r"num_workers=100000 must be in \[0, 1024\]"),
    (["measure.threads=99999"], r"measure\.threads=99999 must be in \[1, 1024\]"),
    (["measure.repeats=1000000000000"], r"measure\.repeats=1000000000000 must be in \[1, 1000000\]"),
    (["measure.batch_sizes=[1,1000000000]"], r"measure\.batch_sizes=\[1, 1000000000\] must be in \[1, 65536\]"),
    # a timing run that never ends
    (["measure.min_time_s=1e308"], r"measure\.min_time_s=1e\+308 must be in \[0, 600\]"),
    # an input size that allocates without bound (issue 27: every size that drives an allocation is bounded)
    (["data.img_size=1000000"], r"data\.img_size=1000000 must be in \[1, 16384\]"),
    # an eval resize of img_size / crop_pct that allocates without bound
    ([*IMAGEFOLDER, "data.crop_pct=1e-9"], r"data\.crop_pct=1e-09 must be in \[0\.25, 1\]"),
    # an empty string (an unset shell variable) silently meaning "unset"
    (["model.checkpoint="], r"model\.checkpoint='' is empty \(an unset shell variable\?\); valid: a path"),
    (["model.checkpoint=' '"], r"model\.checkpoint=' ' is empty"),
    (["data=imagefolder", "data.root="], r"data\.root='' is empty"),
])
def test_late_failing_settings_are_refused_at_startup(tmp_path, no_data, overrides, message):  # noqa: F811
    assert_refused_at_startup(tmp_path, overrides, ConfigError, message)
