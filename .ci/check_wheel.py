"""Packaging check (CI, `make check-wheel`): build the sdist and the wheel, install the wheel into a fresh virtual
environment and import every package from it; check the extras in the wheel's metadata.

Run with the test environment's interpreter (it needs `build` and `setuptools`, both in the `test` extra).
Offline and fast: the build does not use an isolated environment (no download), the wheel is installed with
``--no-deps``, and the fresh environment borrows this interpreter's site-packages through a ``.pth`` file (plain
paths, so this environment's own ``.pth`` files, among them the editable install of cce-jax, are not processed).
The dependencies of each extra are checked against that metadata instead: ``flax``, ``examples`` and ``test``
must be satisfied by the test environment; ``cuda`` must name ``jax[cuda13]`` with the core jax range (never
installed here); ``tunix`` is checked the same way when the project declares it.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_EXTRAS = ("flax", "cuda", "examples", "test")
OPTIONAL_EXTRAS = ("tunix",)  # declared by the Tunix adapters' branch; checked when present
INSTALLED_EXTRAS = ("flax", "examples", "test")  # their requirements must hold in the test environment
IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
                                ".hypothesis", "out", ".whl")
SMOKE = """
import sys, pathlib
import cce_jax, cce_jax.nnx, cce_jax.linen, cce_jax.models, cce_jax.autotune, pallas_kernels
import pallas_kernels.lse_forward, pallas_kernels.backward
venv = pathlib.Path(sys.prefix).resolve()
for module in (cce_jax, cce_jax.nnx, pallas_kernels):
    where = pathlib.Path(module.__file__).resolve()
    assert venv in where.parents, f"{module.__name__} imported from {where}, not from the wheel in {venv}"
import jax.numpy as jnp
loss = cce_jax.linear_cross_entropy(jnp.ones((4, 8)), jnp.ones((11, 8)) / 8, jnp.arange(4))
assert abs(float(loss) - float(jnp.log(11.0))) < 1e-5, float(loss)
print("imports from the wheel: OK")
"""


def fail(msg: str) -> None:
    print(f"check_wheel: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def build(work: Path) -> Path:
    """sdist, then the wheel from the sdist (``python -m build``'s default), from a copy of the tree."""
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    dist = work / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        fail(f"expected one wheel and one sdist in {dist}, got {[p.name for p in dist.iterdir()]}")
    return wheels[0]


def check_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    for package in ("cce_jax/__init__.py", "cce_jax/models/__init__.py", "pallas_kernels/__init__.py"):
        if package not in names:
            fail(f"{package} missing from {wheel.name}")
    extras = meta.get_all("Provides-Extra") or []
    missing = [e for e in REQUIRED_EXTRAS if e not in extras]
    if missing:
        fail(f"{wheel.name} does not declare the extras {missing} (it declares {extras})")
    for extra in OPTIONAL_EXTRAS:
        if extra not in extras:
            print(f"check_wheel: note: no [{extra}] extra declared yet")
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]

    def of(extra):
        return [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})
                and not r.marker.evaluate({"extra": ""})]

    core = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    core_jax = next((r for r in core if r.name == "jax"), None)
    if core_jax is None or not core_jax.specifier:
        fail("the core requirements must bound jax's version")
    cuda = [r for r in of("cuda") if r.name == "jax"]
    if not cuda or "cuda13" not in cuda[0].extras or cuda[0].specifier != core_jax.specifier:
        fail(f"[cuda] must require jax[cuda13]{core_jax.specifier}, got {[str(r) for r in of('cuda')]}")
    for extra in INSTALLED_EXTRAS:
        for req in of(extra) + core:
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                fail(f"[{extra}] needs {req}, which is not installed in the test environment")
            if version not in req.specifier:
                fail(f"[{extra}] needs {req}; the test environment has {req.name} {version}")
    print(f"check_wheel: {wheel.name}: extras {extras}; core jax{core_jax.specifier}; "
          f"cuda -> {[str(r) for r in of('cuda')]}")


def install_and_import(wheel: Path, work: Path) -> None:
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # this environment's site-packages (and any a .pth file of it added), never the source tree
    borrowed = dict.fromkeys([sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + [
        p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()])
    (site / "_borrowed_test_env.pth").write_text("".join(f"{p}\n" for p in borrowed))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    print(run([str(python), "-c", SMOKE], cwd=work, env=env).stdout.strip())


def main() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cce-jax-wheel-") as tmp:
        work = Path(tmp)
        wheel = build(work)
        check_metadata(wheel)
        install_and_import(wheel, work)
    print(f"check_wheel: OK in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
