// Built when TV_ENABLE_CUDA is OFF: the CUDA paths report themselves as unavailable.
#include "tensorvigil/device.h"

namespace tensorvigil {
bool cuda_available() { return false; }
bool cuda_built() { return false; }
}  // namespace tensorvigil
