# Cross-build for 64-bit ARM Linux with Debian's GNU cross toolchain (g++-aarch64-linux-gnu); the
# native tests then run under qemu-user (qemu-aarch64) with the cross sysroot:
#   cmake -S . -B build-arm -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DSDQ_TESTS=ON \
#         -DSDQ_PYTHON=OFF -DSDQ_CUDA=OFF && cmake --build build-arm && ctest --test-dir build-arm
# (tests/test_aarch64_cross.py does this when both tools are installed).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(SDQ_AARCH64_PREFIX aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${SDQ_AARCH64_PREFIX}-gcc)
set(CMAKE_CXX_COMPILER ${SDQ_AARCH64_PREFIX}-g++)
set(CMAKE_FIND_ROOT_PATH /usr/${SDQ_AARCH64_PREFIX})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)  # an sdq install prefix outside the sysroot
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/usr/${SDQ_AARCH64_PREFIX})
