"""The wheels a bare GPU image needs to run the workflow, for carrying to a machine with no index.

    python benchmarks/gpu_wheels.py --have image-packages.txt --out .whl

Walks the dependency closure of the workflow's packages in this venv (importlib.metadata, the
versions of constraints.txt), drops what the image already has (--have: one distribution name a
line, e.g. the list in the device library's KINDS.md) and downloads the rest as CPython 3.12
manylinux wheels (`pip download --no-deps`), building a wheel where PyPI has only an sdist.
bitsandbytes' wheel (43 MB: libraries for CUDA 11.8-13.2 and ROCm) is cut to its CUDA 13 and CPU
libraries (7.4 MB), so that everything fits the device's 64 MiB carry (36 MiB in all).
"""
import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ["snakemake", "mlflow-skinny", "trl", "peft", "datasets", "llmcompressor", "compressed-tensors",
         "jsonschema", "alembic", "sqlalchemy", "openai", "bitsandbytes", "snaketune"]
# Snakemake imports pulp only for its ILP scheduler and falls back without it; torch comes with the image.
SKIP = {"pulp", "torch", "triton"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_24_x86_64", "manylinux1_x86_64", "manylinux_2_27_x86_64", "any"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version for the roots and everything they require (no extras)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in seen or name in SKIP:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def slim_bitsandbytes(wheel: Path, keep: str = r"cuda13\d") -> None:
    """Drop the CUDA/ROCm libraries of a bitsandbytes wheel except ``keep`` (and the CPU one)."""
    import zipfile

    drop = re.compile(rf"bitsandbytes/libbitsandbytes_(?!{keep}|cpu)\w+\.so$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop.search(info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not drop.search(line.split(b",")[0].decode()))
            zout.writestr(info, data)
    slim.replace(wheel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--have", type=Path, required=True, help="names the image already holds, one a line")
    ap.add_argument("--out", type=Path, default=Path(".whl"))
    args = ap.parse_args()
    have = {norm(line.strip()) for line in args.have.read_text().split() if line.strip()}
    need = {n: v for n, v in closure(ROOTS).items() if n not in have and n != "snaketune"}
    args.out.mkdir(parents=True, exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in sorted(need.items()):
        spec = f"{name}=={version.split('+')[0]}"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(args.out), spec])
        if got.returncode:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.out), spec], check=True)
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    size = sum(p.stat().st_size for p in args.out.glob("*.whl")) / 2**20
    print(f"{len(need)} packages, {len(list(args.out.glob('*.whl')))} wheels, {size:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
