"""Build mvmae_fast._C: a pybind11 module with no torch headers (see README, "Architecture").

C++ sources are always compiled. The CUDA sources are compiled with nvcc when it is found
(MVMAE_FAST_CUDA=0 skips them, MVMAE_FAST_CUDA=1 makes a missing or failing nvcc an error) and
linked with the static CUDA runtime, so the module needs no CUDA libraries at import time.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_ARCHS = ("80", "90")


def _relative(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _cuda_mode():
    value = os.environ.get("MVMAE_FAST_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"MVMAE_FAST_CUDA must be 0, 1 or unset, got {value!r}")
    return {"": "auto", "0": "off", "1": "force"}[value]


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvcc_lib_dirs(nvcc, build_dir):
    """Library directories nvcc itself links against (it may be a wrapper script)."""
    probe = build_dir / "probe.cu"
    probe.write_text("")
    out = subprocess.run([nvcc, "--dryrun", "-c", str(probe)], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ LIBRARIES="):
            return [a[2:] for a in shlex.split(line.split("=", 1)[1]) if a.startswith("-L") and "stubs" not in a]
    return []


class BuildExt(build_ext):
    def build_extensions(self):
        # OpenMP: the CPU kernels then run on the process's OpenMP team, which is torch's (see
        # csrc/cpu/parallel.h); without it they fall back to std::thread.
        if has_flag(self.compiler, "-fopenmp"):
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        else:
            print("mvmae_fast: the compiler has no -fopenmp; the CPU kernels use std::thread")
        mode = _cuda_mode()
        nvcc = _find_nvcc() if mode != "off" else None
        if mode == "force" and nvcc is None:
            raise SystemExit("MVMAE_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        if nvcc is None:
            if mode == "auto":
                print("mvmae_fast: nvcc not found, building the CPU kernels only (set MVMAE_FAST_CUDA=1 to require CUDA)")
        else:
            try:
                self._add_cuda(nvcc)
            except (subprocess.CalledProcessError, OSError) as err:
                if mode == "force":
                    raise
                print(f"mvmae_fast: CUDA sources failed to compile ({err}); building the CPU kernels only")
        super().build_extensions()

    def _add_cuda(self, nvcc):
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for source in sorted((CSRC / "cuda").glob("*.cu")):
            obj = build_dir / (source.stem + ".o")
            cmd = [nvcc, "-c", str(source), "-o", str(obj), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
                   "-DMVMAE_FAST_WITH_CUDA", *gencode]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        for ext in self.extensions:
            ext.extra_objects += objects
            ext.define_macros.append(("MVMAE_FAST_WITH_CUDA", "1"))
            ext.library_dirs += _nvcc_lib_dirs(nvcc, build_dir)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]


# Compile the C++ sources in parallel (all cores; MVMAE_FAST_BUILD_JOBS=N to limit).
ParallelCompile("MVMAE_FAST_BUILD_JOBS", default=0).install()

ext = Pybind11Extension(
    "mvmae_fast._C",
    _relative([CSRC / "bindings.cpp", *(CSRC / "cpu").glob("*.cpp")]),
    include_dirs=[str(CSRC)],
    cxx_std=17,
    extra_compile_args=["-O3", "-pthread"],
    extra_link_args=["-pthread"],
)

version = re.search(r'__version__ = "([^"]+)"', (ROOT / "mvmae_fast" / "__init__.py").read_text()).group(1)
setup(version=version, ext_modules=[ext], cmdclass={"build_ext": BuildExt})
