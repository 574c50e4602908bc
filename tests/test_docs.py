"""The README and docs/ as a user reads them: every command they show names scripts, modules,
configs, images and documents that exist, every relative link and picture resolves, and the
README keeps the shape of a user's page."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
# [text](target) and ![alt](target); the target ends at the first space or parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
# the files a command names: relative paths with these extensions
CHECKED_SUFFIXES = (".py", ".yaml", ".md", ".png", ".jpg")
# options and config keys whose value is written by the command, not read
OUTPUT_OPTIONS = {"--output", "--output-dir", "--json", "OUTPUT_DIR", ">"}

README_SECTIONS = [
    "Installation",
    "Getting started",
    "Model zoo",
    "Training and evaluation",
    "Deployment",
    "Documentation",
    "Citing",
]


def shell_commands(text: str) -> list[str]:
    """The commands of every ```bash / sh / shell block, backslash-continued lines joined,
    comments dropped."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        joined = re.sub(r"\s*\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def named_files(command: str) -> tuple[list[str], list[str]]:
    """(files, modules) a command reads: ``python X.py`` scripts, ``python -m M`` modules,
    and relative paths ending in one of CHECKED_SUFFIXES that are not outputs (under
    ``output/`` or after an output option)."""
    tokens = shlex.split(command, comments=True)
    files, modules = [], []
    previous = ""
    for i, token in enumerate(tokens):
        if previous == "-m" and i >= 2 and tokens[i - 2].endswith(("python", "python3")):
            modules.append(token)
        elif "://" in token or token.startswith(("/", "~", "$")) or previous in OUTPUT_OPTIONS:
            pass
        elif token.startswith("output/") or "=" in token or "*" in token:
            pass  # outputs of earlier commands, KEY=VALUE, globs of run outputs
        elif token.endswith(CHECKED_SUFFIXES):
            files.append(token)
        previous = token
    return files, modules


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_commands_name_what_exists(page: Path):
    commands = shell_commands(page.read_text(encoding="utf-8"))
    missing = []
    for command in commands:
        files, modules = named_files(command)
        missing += [f"{f!r} in `{command}`" for f in files if not (ROOT / f).exists()]
        missing += [f"module {m!r} in `{command}`" for m in modules
                    if importlib.util.find_spec(m.split(".")[0]) is None
                    or (m.startswith("dab_detr") and not _module_path(m).exists())]
    assert not missing, f"{page.name}: commands name what is not in the repository:\n" + \
        "\n".join(missing)


def _module_path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path if path.is_dir() else path.with_suffix(".py")


def test_readme_shows_the_main_commands():
    """The parser above sees the README's commands: the ones a new user needs are there."""
    commands = "\n".join(shell_commands((ROOT / "README.md").read_text(encoding="utf-8")))
    for needed in ("make run", "make test", "train_net.py", "--eval-only", "--num-gpus",
                   "--resume", "demo/demo.py", "python -m dab_detr.export",
                   "python -m dab_detr.convert", "DATASETS.REGISTER_COCO", "SOLVER.EPOCHS"):
        assert needed in commands, f"no README command shows {needed}"


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, spaces to '-', punctuation other
    than '-' and '_' dropped."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_links_and_pictures_resolve(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(ROOT)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


def test_github_anchor_rule():
    assert github_anchor("Training and evaluation") == "training-and-evaluation"
    assert github_anchor("Does denoising converge sooner? On `dab_shapes`, yes") == \
        "does-denoising-converge-sooner-on-dab_shapes-yes"
    assert github_anchor("DAB-DETR, R50-DC5") == "dab-detr-r50-dc5"


def test_readme_is_a_users_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    sections = re.findall(r"^## (.+)$", FENCE.sub("", text), re.M)
    assert [s for s in sections if s in README_SECTIONS] == README_SECTIONS, sections


def test_model_zoo_lists_every_coco_config():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    zoo = text.split("## Model zoo", 1)[1].split("\n## ", 1)[0]
    for config in sorted((ROOT / "configs" / "COCO-Detection").glob("*.yaml")):
        assert config.stem in zoo, f"the README's model zoo has no row for {config.name}"


def test_named_files_parser():
    files, modules = named_files(
        "python tools/plot_metrics.py output/x/metrics.json --output docs/images/y.png "
        "--config-file configs/a.yaml MODEL.WEIGHTS m.pth")
    assert files == ["tools/plot_metrics.py", "configs/a.yaml"]
    files, modules = named_files("python -m dab_detr.convert --source official in.pth out.pth")
    assert (files, modules) == ([], ["dab_detr.convert"])
    assert shell_commands("```bash\npython a.py \\\n    --x b.yaml  # c\n```\n") == \
        ["python a.py --x b.yaml"]


def test_architecture_lists_every_module():
    """docs/architecture.md's layout names every module of the package and the tools."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    modules = [p for folder in ("dab_detr", "tools", "benchmarks", "demo")
               for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules
               if not re.search(rf"(^|\s){re.escape(p.name)}\b", layout, re.M)]
    assert not missing, f"docs/architecture.md's layout does not list {missing}"
