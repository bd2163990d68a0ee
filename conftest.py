"""Root conftest: the in-process Celery fixtures (``celery_worker`` …).

pytest-celery's container fixtures need a Docker engine; the classic
``celery.contrib.pytest`` plugin runs a real worker in a thread instead.
"""

pytest_plugins = ("celery.contrib.pytest",)
