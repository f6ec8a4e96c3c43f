// The native tests' one assertion: expect() prints each check and counts the failures; main
// returns finish(), which prints PASS or FAIL and gives ctest the exit code.
#pragma once
#include <cstdio>

namespace sdq_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures();
}

inline int finish() {
  std::printf("%s\n", failures() == 0 ? "PASS" : "FAIL");
  return failures() == 0 ? 0 : 1;
}

}  // namespace sdq_test
