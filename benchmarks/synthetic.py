"""The benchmarks' synthetic Services: the package's generator (testbed/synthetic.py),
re-exported so benchmark scripts run from a checkout without installing anything."""

from testbed.synthetic import service_capacity, synthetic_objects  # noqa: F401
