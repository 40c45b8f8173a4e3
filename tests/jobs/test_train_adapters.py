"""The private APIs crucible relies on (``crucible.jobs.train.adapters``) exist in the installed
versions, which are in the range each adapter supports."""

from __future__ import annotations

import logging

from packaging.version import Version

from crucible.jobs.train.adapters import ray as ray_adapter


def test_ray_is_in_the_adapters_range_and_has_the_report_logger() -> None:
    import ray
    from ray.train.v2._internal.execution import context

    low, high = ray_adapter.SUPPORTED
    assert Version(low) <= Version(ray.__version__) < Version(high), ray.__version__
    # the logger ray.train.report writes through is named by its module's file
    assert context.logger.name == context.__file__
    ray_adapter.quiet_report_log()
    assert logging.getLogger(context.__file__).level == logging.WARNING
