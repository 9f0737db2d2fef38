"""Reading the server's ``--conf`` numbers: a bad one names the key, the value and what it should be."""

from __future__ import annotations

import pytest

from contourcl.errors import ConfigError
from contourcl.serving.conf import conf_int, conf_positive
from contourcl.serving.security import limits


def test_a_positive_number_is_read_or_refused_by_name():
    assert conf_positive({}, "dicom_push_retry_s", 30.0, "seconds") == 30.0
    assert conf_positive({"dicom_push_retry_s": " 2.5 "}, "dicom_push_retry_s", 30.0, "seconds") == 2.5
    for bad, said in (("soon", "give a number of seconds"), ("0", "must be more than 0 seconds"), (-1, "more than 0"),
                      ("nan", "more than 0"), (None, "give a number")):
        with pytest.raises(ConfigError, match=f"--conf dicom_push_retry_s .*{said}"):
            conf_positive({"dicom_push_retry_s": bad}, "dicom_push_retry_s", 30.0, "seconds")
    with pytest.raises(ValueError, match="max_model_mb '0': must be more than 0 megabytes"):  # the server's body limits
        limits({"max_model_mb": "0"})
    assert limits({"max_upload_mb": "1.5"})["max_upload_mb"] == 1.5


def test_a_whole_number_is_read_or_refused_by_name():
    assert conf_int({"slots": "3"}, "slots", 1, 1) == 3
    with pytest.raises(ValueError, match="--conf slots '0': at least 1"):
        conf_int({"slots": "0"}, "slots", 1, 1)
    with pytest.raises(ValueError, match="--conf slots 'two': give a whole number"):
        conf_int({"slots": "two"}, "slots", 1, 1)
