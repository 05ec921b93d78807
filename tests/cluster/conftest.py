import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this machine for one test module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
