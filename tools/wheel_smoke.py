"""Build sdq's sdist and wheel, install the wheel in a fresh virtual environment with no compiler
on PATH, and run tools/smoke_test.py there.

Steps (each one fails loudly, printing the tail of its log):
  1. `python -m build` in a build venv: the sdist, then the wheel FROM the unpacked sdist (so a
     file missing from the sdist fails the build), Release, CMake + Ninja, SDQ_CUDA=OFF unless
     --cuda ON. PyPI (or a configured index) must be reachable for the isolated build
     environment, unless its requirements are already cached.
  2. The sdist holds CMakeLists.txt, pyproject.toml, README.md, cpp/, cuda/, python/sdq/ and no
     build outputs; the wheel holds one sdq/_core extension whose NEEDED libraries (readelf -d)
     include no libtorch, libc10, libpython or CUDA runtime: one wheel serves every torch in the
     declared range, and the CUDA runtime is linked statically.
  3. A fresh venv (--system-site-packages: it reuses the torch, numpy, safetensors, tqdm and
     transformers already installed) gets the wheel by `pip install --no-index --no-deps
     --only-binary :all:`, under a PATH holding only the venv's bin/ (checked: no cc, gcc, c++,
     nvcc, ...) and an environment without PYTHONPATH or pip configuration.
  4. tools/smoke_test.py runs in that venv (python -I, from an empty folder): imports sdq from the
     venv, checks the declared dependency ranges, quantizes, compares the kernels with F.linear,
     and round-trips a tiny model through quantize_ / save / load.
Prints the build time, the wheel's size and the smoke test's time. `auditwheel show` is run
when auditwheel is installed (manylinux wheels themselves come from cibuildwheel, pyproject.toml).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Libraries the extension must not link: torch (any torch in the range must do), Python itself
# (manylinux extensions resolve Python symbols from the interpreter) and the CUDA runtime
# (linked statically, so only the driver is needed).
FORBIDDEN = re.compile(r"libtorch|libc10|libpython|libcudart|libshm")
SDIST_NEEDS = ("CMakeLists.txt", "pyproject.toml", "README.md", "cpp/src/", "cpp/include/sdq/",
               "cpp/bindings/", "cuda/", "python/sdq/__init__.py")
SDIST_JUNK = re.compile(r"(^|/)(build|dist|_skbuild|__pycache__)/|\.so$")


class StepFailed(Exception):
    pass


def run(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> float:
    """Runs cmd with its output in `log`; returns its wall time; StepFailed with the log's tail."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=cwd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-60:])
        raise StepFailed(f"`{' '.join(map(str, cmd))}` exited with {proc.returncode} "
                         f"(log: {log}):\n{tail}")
    return seconds


def make_venv(path: Path) -> Path:
    """A fresh venv that also sees the packages of the environment running this script (torch
    etc., after its own); returns its python."""
    try:
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(path)
    except Exception as e:  # e.g. Debian's python without ensurepip
        raise StepFailed(f"cannot create a virtual environment at {path} ({e}); on Debian/Ubuntu "
                         "install python3-venv") from e
    if sys.prefix != sys.base_prefix:
        # Run from a venv: --system-site-packages reaches only the base interpreter's packages,
        # so point at this venv's site-packages too (appended: the new venv's own come first).
        outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        own = next((path / "lib").glob("python3*/site-packages"))
        (own / "_outer_env.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in sorted(outer)))
    return path / "bin" / "python"


def build_env(cuda: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["SDQ_CUDA"] = cuda
    env.setdefault("CMAKE_GENERATOR", "Ninja")
    return env


def build(work: Path, cuda: str) -> tuple[Path, Path, float]:
    """sdist + wheel from the sdist; returns (sdist, wheel, seconds of `python -m build`)."""
    py = make_venv(work / "build-venv")
    env = build_env(cuda)
    # cwd=work: from the checkout, its build/ folder would pass for the `build` package
    probe = subprocess.run([py, "-c", "import build.__main__"], env=env, capture_output=True,
                           cwd=work)
    if probe.returncode != 0:  # not in the system site-packages: fetch the build frontend
        run([py, "-m", "pip", "install", "--quiet", "build"], work / "pip-build.log", env, work)
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)  # a reused --workdir: only this build's files
    print(f"building sdist and wheel (SDQ_CUDA={cuda}; log {work / 'build.log'}) ...", flush=True)
    seconds = run([py, "-m", "build", "--outdir", dist, ROOT], work / "build.log", env, work)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise StepFailed(f"expected one sdist and one wheel in {dist}, found {sdists + wheels}")
    return sdists[0], wheels[0], seconds


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    missing = [n for n in SDIST_NEEDS if not any(m.startswith(n) for m in names)]
    junk = [n for n in names if SDIST_JUNK.search(n)]
    if missing or junk:
        raise StepFailed(f"{sdist.name}: missing {missing}, unwanted {junk[:10]}")
    print(f"sdist {sdist.name}: {len(names)} files, {sdist.stat().st_size / 1e6:.2f} MB")


def needed_libraries(so: Path) -> list[str]:
    """The DT_NEEDED entries of an ELF shared object (readelf -d, else objdump -p)."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True,
                             check=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    if shutil.which("objdump"):
        out = subprocess.run(["objdump", "-p", str(so)], capture_output=True, text=True,
                             check=True).stdout
        return re.findall(r"^\s*NEEDED\s+(\S+)", out, re.MULTILINE)
    raise StepFailed("neither readelf nor objdump (binutils) is installed")


def forbidden_links(so: Path) -> list[str]:
    return [lib for lib in needed_libraries(so) if FORBIDDEN.search(lib)]


def check_wheel(wheel: Path, work: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        cores = [n for n in z.namelist() if re.fullmatch(r"sdq/_core\.[^/]*\.so", n)]
        if len(cores) != 1 or "sdq/__init__.py" not in z.namelist():
            raise StepFailed(f"{wheel.name}: expected sdq/__init__.py and one sdq/_core*.so, "
                             f"found {cores}")
        so = Path(z.extract(cores[0], work / "wheel-core"))
    needed = needed_libraries(so)
    bad = [lib for lib in needed if FORBIDDEN.search(lib)]
    if bad:
        raise StepFailed(f"{cores[0]} links {bad}: it must not (needed: {needed})")
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB; {cores[0]} needs "
          f"{', '.join(needed)}")
    if shutil.which("auditwheel"):
        out = subprocess.run(["auditwheel", "show", str(wheel)], capture_output=True, text=True)
        print(f"auditwheel show: {' '.join((out.stdout + out.stderr).split())}")


def bare_env(venv_dir: Path) -> dict:
    """The environment of the install and the smoke test: the venv's bin/ as the only PATH entry,
    no PYTHONPATH, no pip configuration (so no index and no find-links), no compiler variables."""
    env = {"PATH": str(venv_dir / "bin"), "VIRTUAL_ENV": str(venv_dir),
           "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1", "HF_HUB_OFFLINE": "1"}
    for keep in ("HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    return env


def install_and_smoke(wheel: Path, work: Path, cuda: str) -> tuple[float, float]:
    venv_dir = work / "venv"
    py = make_venv(venv_dir)
    env = bare_env(venv_dir)
    visible = [c for c in ("cc", "gcc", "c++", "g++", "clang", "nvcc")
               if shutil.which(c, path=env["PATH"])]
    if visible:
        raise StepFailed(f"compilers visible on the install PATH: {visible}")
    installed = run([py, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall",
                     "--only-binary", ":all:", wheel], work / "install.log", env)
    so = next((venv_dir / "lib").glob("python3*/site-packages/sdq/_core*.so"), None)
    if so is None:
        raise StepFailed(f"the wheel did not install sdq/_core into {venv_dir}")
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout \
        if shutil.which("ldd") else ""
    if "not found" in ldd:
        raise StepFailed(f"{so} has unresolved libraries:\n{ldd}")
    print(f"installed in {installed:.1f} s into a fresh venv; PATH={env['PATH']} (no compiler)")
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    expect = "yes" if cuda == "ON" else "no" if cuda == "OFF" else "any"
    log = work / "smoke.log"
    smoke = run([py, "-I", ROOT / "tools" / "smoke_test.py", "--no-compiler",
                 "--expect-cuda", expect], log, env, cwd=run_dir)
    print(log.read_text(), end="")
    return installed, smoke


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path,
                    help="folder for the venvs, dist/ and logs (kept); default: a temporary "
                         "folder, removed on success")
    ap.add_argument("--cuda", choices=("OFF", "ON", "AUTO"), default="OFF",
                    help="SDQ_CUDA for the build (default OFF: the CPU wheel; ON: the CUDA "
                         "variant, version +cuda, needs nvcc)")
    ap.add_argument("--wheel", type=Path,
                    help="smoke-test this wheel instead of building one (skips steps 1-2's build)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sdq-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    try:
        if args.wheel:
            wheel, built = args.wheel.resolve(), None
        else:
            sdist, wheel, built = build(work, args.cuda)
            check_sdist(sdist)
        check_wheel(wheel, work)
        installed, smoke = install_and_smoke(wheel, work, args.cuda)
    except StepFailed as e:
        print(f"wheel_smoke: FAILED: {e}", file=sys.stderr)
        print(f"(work folder kept: {work})", file=sys.stderr)
        return 1
    size = wheel.stat().st_size / 1e6
    build_text = f"build {built:.1f} s, " if built is not None else ""
    print(f"wheel_smoke: OK {wheel.name}: {size:.2f} MB, {build_text}install {installed:.1f} s, "
          f"smoke test {smoke:.1f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
