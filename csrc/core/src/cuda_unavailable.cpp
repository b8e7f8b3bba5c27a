// The CUDA entry points of a build without CUDA: they report that plainly instead of being absent,
// so a C++ service links the same symbols whichever way the core was built.
#include "adsc/adsc.h"
#include "adsc/compact.h"
#include "adsc/paged_kv.h"
#include "adsc/plan.h"

namespace adsc {
namespace {
Status not_compiled(const char* what) {
  return fail(Status::kNotCompiled, "%s: this build of the adsc core has no CUDA support "
              "(configure with CUDA available and ADSC_WITH_CUDA=ON)", what);
}
}  // namespace

Status plan_cuda(const PlanParams&, adsc_stream_t) noexcept { return not_compiled("plan_cuda"); }
Status compact_tokens_cuda(const CompactTokensParams&, int32_t*, adsc_stream_t) noexcept {
  return not_compiled("compact_tokens_cuda");
}
Status scatter_add_rows_cuda(const ScatterAddRowsParams&, int32_t*, adsc_stream_t) noexcept {
  return not_compiled("scatter_add_rows_cuda");
}
Status write_paged_kv_cuda(const PagedKVParams&, int32_t*, adsc_stream_t) noexcept {
  return not_compiled("write_paged_kv_cuda");
}

}  // namespace adsc

extern "C" int adsc_cuda_compiled(void) { return 0; }
