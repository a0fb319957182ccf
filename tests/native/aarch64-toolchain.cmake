# Cross build of the native tests for aarch64 Linux, the NEON path of the CPU kernels (Apple CPUs run
# it); tests/test_native.py builds it and runs test_cpu_kernels under qemu-user:
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=tests/native/aarch64-toolchain.cmake -DMETALQ_SANITIZE=OFF
#   cmake --build build-aarch64 --target test_cpu_kernels && qemu-aarch64 build-aarch64/test_cpu_kernels
# Needs g++-aarch64-linux-gnu and qemu-user (Debian). Linked statically, so qemu needs no sysroot.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_EXE_LINKER_FLAGS_INIT -static)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64)  # lets ctest run the test in the build folder
