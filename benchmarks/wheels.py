"""Build `.whl/`: the third-party wheels the GPU scripts carry to the device (it reaches no package index).

    python benchmarks/wheels.py [--dest .whl]

- fla-core 0.6.0 and flash-linear-attention 0.6.0 (pure-Python wheels): the anchors of benchmarks/delta_rule.py
  and benchmarks/train_step.py.
- mamba_ssm 2.3.2.post1, its Triton kernels only (`mamba_ssm.ops.triton`: the SSD chunked scan
  `mamba_chunk_scan_combined` and `selective_state_update`, which fla 0.6.0's Mamba2ForCausalLM calls on its fast
  path). PyPI ships mamba_ssm as a source archive whose build compiles CUDA extensions; this script takes the
  archive (sha256 checked against PyPI's), keeps the Triton modules and the two small utilities they import
  unchanged, gives the package an empty `__init__` (the original imports the CUDA selective-scan extension that
  is not built) and writes a pure wheel `mamba_ssm-2.3.2.post1+triton-py3-none-any.whl`. fla then runs its
  Mamba-2 on mamba_ssm's kernels instead of its naive PyTorch fallback.

The device scripts install them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`
(benchmarks/gpu_steps.sh); carry `.whl` (`carry: [".whl"]`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

PURE_WHEELS = ("fla-core==0.6.0", "flash-linear-attention==0.6.0")
MAMBA_VERSION = "2.3.2.post1"
# the modules of mamba_ssm that its Triton SSD path imports (ssd_combined → ssd_*, layernorm_gated, k_activations,
# softplus, utils.determinism, utils.torch) and selective_state_update; the package __init__s are written empty
MAMBA_KEEP = ("mamba_ssm/ops/triton/", "mamba_ssm/utils/torch.py", "mamba_ssm/utils/determinism.py",
              "mamba_ssm/LICENSE")
MAMBA_EMPTY = ("mamba_ssm/__init__.py", "mamba_ssm/ops/__init__.py", "mamba_ssm/ops/triton/__init__.py",
               "mamba_ssm/utils/__init__.py")


def download_pure(dest: Path) -> None:
    """pip's own download of the pure wheels (Python 3.12, the device's)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(dest), *PURE_WHEELS], check=True)


def mamba_sdist() -> bytes:
    """The mamba_ssm source archive from PyPI, checked against PyPI's sha256."""
    with urllib.request.urlopen("https://pypi.org/pypi/mamba-ssm/json", timeout=60) as r:
        releases = json.load(r)["releases"]
    (sdist,) = [u for u in releases[MAMBA_VERSION] if u["packagetype"] == "sdist"]
    with urllib.request.urlopen(sdist["url"], timeout=120) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
        raise SystemExit(f"wheels: {sdist['url']} does not match PyPI's sha256; run again")
    return data


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def mamba_triton_wheel(sdist: bytes, dest: Path) -> Path:
    """A pure wheel of mamba_ssm's Triton kernels (see the module docstring)."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        root = f"mamba_ssm-{MAMBA_VERSION}/"
        for member in tar.getmembers():
            name = member.name.removeprefix(root)
            if name == "LICENSE":
                name = "mamba_ssm/LICENSE"
            keep = name.startswith(MAMBA_KEEP[0]) and name.count("/") == 3 and name.endswith(".py")
            if member.isfile() and (keep or name in MAMBA_KEEP[1:]):
                files[name] = tar.extractfile(member).read()
    missing = [m for m in ("mamba_ssm/ops/triton/ssd_combined.py", *MAMBA_KEEP[1:]) if m not in files]
    if missing:
        raise SystemExit(f"wheels: mamba_ssm {MAMBA_VERSION}'s archive lacks {missing}")
    files.update({name: b"" for name in MAMBA_EMPTY})
    version = f"{MAMBA_VERSION}+triton"
    info = f"mamba_ssm-{version}.dist-info"
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: mamba_ssm\nVersion: {version}\n"
                                 "Summary: mamba_ssm's Triton kernels only (built by longtrain's "
                                 "benchmarks/wheels.py)\nLicense: Apache-2.0\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: longtrain\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [record_line(n, d) for n, d in sorted(files.items())] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / f"mamba_ssm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"), help="folder of the wheels (default .whl)")
    args = ap.parse_args()
    try:
        args.dest.mkdir(parents=True, exist_ok=True)
        download_pure(args.dest)
        path = mamba_triton_wheel(mamba_sdist(), args.dest)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"wheels: pip download exited with {e.returncode} (its message is above); this needs "
                         "the package index") from None
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:  # URLError is an OSError
        raise SystemExit(f"wheels: {type(e).__name__}: {e}; this needs pypi.org and a writable --dest") from None
    print(f"wheels: {', '.join(sorted(p.name for p in args.dest.glob('*.whl')))} in {args.dest} ({path.name} built)")


if __name__ == "__main__":
    main()
