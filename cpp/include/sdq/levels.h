// The two code alphabets of the quantizer.
#pragma once

namespace sdq {

enum class Levels : int {
  binary = 2,   // codes in {-1, +1}: one bitplane
  ternary = 3,  // codes in {-1, 0, +1}: two bitplanes
};

}  // namespace sdq
