"""Trust tests (issue #11): every run ends in a checkpoint that loads, or in one clear error with nothing lost.

A package, so that ``trust/test_errors.py`` does not collide with ``tests/python/test_errors.py``; the helpers of
``tests/python`` (``testdata``, ``checkpoints``) import as usual because ``tests/python/conftest.py`` puts that
folder on ``sys.path``.
"""
