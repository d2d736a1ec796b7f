"""The README's Python example is a file that runs."""
import re
from pathlib import Path


def test_readme_python_example_runs(tmp_path, monkeypatch, task):
    task("digits-lenet300")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "edgecompress-out" / "lenet300-pruned.onnx").stat().st_size > 1_000_000
