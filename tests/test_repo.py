from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text().splitlines()
    i = readme.index("# set up and run the tests")
    command = readme[i + 1].strip()
    assert "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The ten-line example in the README, run as written on tiny stand-ins."""
    import torch
    from torch import nn

    from helpers import blobs

    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('precision="bf16"', 'precision="fp32"').replace("epochs=30", "epochs=1")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {
        "student": nn.Linear(8, 3),
        "teacher": nn.Linear(8, 3),
        "train_set": blobs(),
        "val_set": blobs(seed=1),
    }
    exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "runs" / "mine" / "metrics.jsonl").exists()
