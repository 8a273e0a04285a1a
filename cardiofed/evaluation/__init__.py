"""Evaluation of risk models: discrimination and calibration metrics, HTML reports.

:func:`cardiofed.evaluation.report.write_report` is imported from its module so that
scoring does not load matplotlib.
"""

from cardiofed.evaluation.metrics import binary_metrics

__all__ = ["binary_metrics"]
