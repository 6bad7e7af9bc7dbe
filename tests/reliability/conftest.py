"""The reliability suite reuses the untrained tiny model of the inference tests."""

from tests.inference.conftest import scans, tiny_plan, tiny_run  # noqa: F401 - fixtures
