"""`pip install --no-build-isolation .` (docs/PYTHON.md): builds the extension hybrid_mamba._core
with this repository's CMake project (target hm_python) and installs the hybrid_mamba package
and its alias honest_mamba. Nothing is downloaded: CMake, pybind11, NumPy and setuptools are
Debian's (setup.sh). HM_CMAKE_BUILD_DIR=<dir> reuses a configured build tree instead of a
fresh one in build-pip/cmake."""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.environ.get("HM_CMAKE_BUILD_DIR")
        if not build_dir:
            build_dir = os.path.join(ROOT, "build-pip", "cmake")
            subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                            "-DHM_BUILD_TESTS=OFF", "-DHM_BUILD_BENCH=OFF",
                            f"-DPython3_EXECUTABLE={sys.executable}"], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", build_dir, "--target", "hm_python", "-j", jobs], check=True)
        built = glob.glob(os.path.join(build_dir, "python", "hybrid_mamba", "_core*.so"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _core*.so in {build_dir}/python/hybrid_mamba, found {built}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built[0], dest)


setup(
    name="hybrid_mamba",
    version="0.1.0",
    description="The seed's HybridMambaConfig / HybridMambaModel API on the hybrid-mamba C++ engine",
    python_requires=">=3.9",
    install_requires=["numpy"],
    packages=["hybrid_mamba", "honest_mamba"],
    package_dir={"": "python"},
    package_data={"hybrid_mamba": ["*.pyi", "py.typed"]},
    ext_modules=[Extension("hybrid_mamba._core", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    options={"build": {"build_base": "build-pip"}, "egg_info": {"egg_base": "build-pip"}},
    zip_safe=False,
)
