"""The Python examples of README.md run as written (from the repository root): the host ones
everywhere, the CUDA one (it names `device="cuda"`) where there is a GPU."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def examples(on_gpu: bool) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    chosen = [block for block in blocks if ('device="cuda"' in block) == on_gpu]
    assert chosen, f"README.md has no Python example {'on' if on_gpu else 'off'} a GPU"
    return chosen


def run(blocks: list[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_python_example_runs(monkeypatch, capsys):
    run(examples(on_gpu=False), monkeypatch)
    assert "cannot export a tensor that requires grad" in capsys.readouterr().out


@pytest.mark.cuda
def test_the_readme_cuda_example_runs(monkeypatch):
    run(examples(on_gpu=True), monkeypatch)
