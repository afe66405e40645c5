"""The paper's package (PyPI ``prefix-grouper``) installs the same import package,
``prefix_grouper/``, as this one (``prefix-grouper-kernels``). Wherever ``import
prefix_grouper`` loads this package while the paper's is also there, it warns once, with a
fix command (this distribution is not on PyPI: the fix reinstalls from the checkout).

Each case runs a fresh interpreter. The paper's install is faked in a temporary venv (its
dist-info with METADATA and RECORD, and its file names under prefix_grouper/); the last
test installs the real wheel where PyPI can be reached."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

import prefix_grouper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_FILES = ["__init__.py", "__version__.py", "forward.py", "function.py", "info.py", "utils/__init__.py",
               "utils/mask.py", "utils/register_transformers.py", "utils/typing.py"]  # its 0.0.1.post1 wheel
WARNING = "It shares the import name prefix_grouper"
IMPORT = "import prefix_grouper, importlib; importlib.reload(prefix_grouper); print(prefix_grouper.__file__)"


def fake_paper_install(site, *, with_metadata=True, files=PAPER_FILES):
    """The paper's files under ``site``/prefix_grouper/ and, with ``with_metadata``, its dist-info."""
    for name in files:
        path = site / "prefix_grouper" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("PAPER_PACKAGE = True\n" if name == "__init__.py" else "")
    if with_metadata:
        info = site / "prefix_grouper-0.0.1.post1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.4\nName: prefix_grouper\nVersion: 0.0.1.post1\n")
        (info / "RECORD").write_text("".join(f"prefix_grouper/{name},,\n" for name in files)
                                     + "prefix_grouper-0.0.1.post1.dist-info/RECORD,,\n")


@pytest.fixture
def venv_with_paper(tmp_path):
    """``(python, site-packages)`` of a venv holding the paper's package, that also sees this
    environment's site-packages (where the editable install of the checkout is) after its own."""
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = next((root / "lib").glob("python*/site-packages"))
    # addsitedir (not a bare path line) also runs this environment's .pth files: the editable finder.
    parent = sysconfig.get_paths()["purelib"]
    (site / "zz_parent_environment.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    return python, site


def run(python, *args, cwd, env=None):
    return subprocess.run([str(python), "-W", "default", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


def warnings_in(result):
    return [line for line in result.stderr.splitlines() if WARNING in line]


def test_the_checkout_beside_the_papers_install_warns_once_with_a_fix(venv_with_paper, tmp_path):
    python, site = venv_with_paper
    fake_paper_install(site)
    result = run(python, "-c", IMPORT, cwd=REPO_ROOT)  # the checkout's prefix_grouper/ comes first
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == os.path.join(REPO_ROOT, "prefix_grouper", "__init__.py")
    (line,) = warnings_in(result)  # once, though imported and reloaded
    assert "the paper's package prefix-grouper 0.0.1.post1 is installed" in line and str(site) in line
    assert line.rstrip().endswith(f"Fix: pip uninstall -y prefix-grouper prefix-grouper-kernels && "
                                  f"pip install 'setuptools>=77' && pip install --no-build-isolation -e {REPO_ROOT}")
    # Outside the checkout, the paper's regular package comes before the editable install's
    # finder: this package's code never runs there, so it cannot warn (the docs must say so).
    outside = run(python, "-c", IMPORT, cwd=tmp_path)
    assert outside.stdout.strip() == str(site / "prefix_grouper" / "__init__.py") and not warnings_in(outside)


@pytest.mark.parametrize("with_metadata", [True, False], ids=["with its RECORD", "files only"])
def test_both_packages_files_in_one_place_warn(with_metadata, tmp_path):
    """This package installed over the paper's (or the other way round, partly): the
    directory holds both packages' files; our __init__ finds the paper's own modules."""
    site = tmp_path / "site"
    fake_paper_install(site, with_metadata=with_metadata)
    shutil.copytree(os.path.join(REPO_ROOT, "prefix_grouper"), site / "prefix_grouper", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, PYTHONPATH=str(site))
    result = run(sys.executable, "-c", IMPORT, cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip() == str(site / "prefix_grouper" / "__init__.py"), \
        result.stderr[-2000:]
    (line,) = warnings_in(result)
    assert (f"{site / 'prefix_grouper'} holds files of both packages" in line
            and "function.py" in line and "info.py" in line)
    # A copy in site-packages has no checkout to reinstall from: the command says what to fill in.
    assert line.rstrip().endswith("pip install --no-build-isolation -e <your prefix-grouper-kernels checkout>")


def test_no_paper_package_no_warning(tmp_path):
    result = run(sys.executable, "-W", "error", "-c", IMPORT, cwd=REPO_ROOT)
    assert result.returncode == 0 and not warnings_in(result), result.stderr[-2000:]


def test_importing_the_package_imports_no_torch():
    """The names load on first use: ``import prefix_grouper`` stays cheap (--help of the CLIs)."""
    result = subprocess.run([sys.executable, "-c", "import sys, prefix_grouper; assert 'torch' not in sys.modules; "
                             "prefix_grouper.GroupLayout; assert 'torch' in sys.modules; "
                             "assert prefix_grouper.attention.prefix_attention is prefix_grouper.prefix_attention"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(prefix_grouper.__all__) <= set(dir(prefix_grouper))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        prefix_grouper.no_such_name


def test_the_real_paper_wheel_beside_the_checkout_warns(venv_with_paper):
    python, site = venv_with_paper
    source = os.environ.get("PREFIX_GROUPER_PAPER_WHEEL", "prefix-grouper==0.0.1.post1")
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                               source], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {source} timed out")
    if done.returncode != 0:
        pytest.skip(f"cannot install the paper's package ({source}): {done.stderr.strip()[-300:]}")
    result = run(python, "-c", IMPORT, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = warnings_in(result)
    assert "the paper's package prefix-grouper 0.0.1.post1 is installed" in line
