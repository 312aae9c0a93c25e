from tests.fixtures.models import tiny_models  # noqa: F401  (pytest_plugins is only allowed at the rootdir)
