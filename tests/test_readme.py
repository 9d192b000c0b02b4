"""Every ```python block of the README runs, in order, in one namespace (blocks tagged ```python skip-test
need several devices or a GPU and are exercised by their own tests)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_examples():
    assert len(_blocks()) >= 2


def test_readme_examples_run():
    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as err:  # name the block: a README example that fails is a documentation bug
            raise AssertionError(f"README python block {i} failed: {err!r}\n{block}") from err
