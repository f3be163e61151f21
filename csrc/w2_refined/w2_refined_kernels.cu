// w2_refined: the fused CUDA kernels (one block per (batch, head), n <= 64) and their host emulation. The
// work of a block is w2_refined_block.cuh; the kernels and dispatch are common/launch.cuh's.

#include "common/launch.cuh"
#include "w2_refined/w2_refined.h"
#include "w2_refined/w2_refined_block.cuh"

namespace awr_fast {
namespace w2_refined {
namespace {

struct Family {
  using Args = w2_refined::Args;
  template <typename T, typename Acc>
  static AWR_HD void forward(const Args& args, int64_t bh, Acc* smem) {
    forward_block<T, Acc>(args, bh, smem);
  }
  template <typename T, typename Acc>
  static AWR_HD void backward(const Args& args, int64_t bh, Acc* smem) {
    backward_block<T, Acc>(args, bh, smem);
  }
};

}  // namespace

cudaError_t forward_launch(Dtype dtype, const Args& args, cudaStream_t stream) {
  return refine::launch<Family>(dtype, args, false, stream);
}
cudaError_t backward_launch(Dtype dtype, const Args& args, cudaStream_t stream) {
  return refine::launch<Family>(dtype, args, true, stream);
}
void forward_host(Dtype dtype, const Args& args) { refine::host<Family>(dtype, args, false); }
void backward_host(Dtype dtype, const Args& args) { refine::host<Family>(dtype, args, true); }

}  // namespace w2_refined
}  // namespace awr_fast
