// coup_fast ops: one schema, CPU implementation here, CUDA implementation in cuda/coup_ops.cu.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>

#include "coup_math.h"

namespace coup_fast {

namespace {

void check_state(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of x ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void check_rng(const at::Tensor& rng, const at::Tensor& x) {
  TORCH_CHECK(rng.dtype() == at::kLong && rng.numel() == 2, "rng must be an int64 tensor (seed, step) of 2 elements");
  TORCH_CHECK(rng.device() == x.device(), "rng must be on ", x.device());
}

// Calls use(i, z_i) for i in [begin, end), z_i = normal(seed, base + i).  The Philox rounds run in
// a loop of their own over a chunk: alone they vectorize, next to the libm calls they would not.
template <typename acc_t, typename Use>
void for_each_normal(uint64_t seed, uint64_t base, int64_t begin, int64_t end, Use&& use) {
  constexpr int64_t kChunk = 256;
  uint32_t r0[kChunk], r1[kChunk];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t len = std::min(kChunk, end - start);
    for (int64_t j = 0; j < len; ++j) philox_4x32(seed, base + static_cast<uint64_t>(start + j), r0[j], r1[j]);
    for (int64_t j = 0; j < len; ++j) use(start + j, box_muller<acc_t>(r0[j], r1[j]));
  }
}

}  // namespace

at::Tensor em_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& guidance,
                       const at::Tensor& rng, double beta_dt, double lam) {
  TORCH_CHECK(x.device().is_cpu(), "em_step_cpu: x must be a CPU tensor");
  check_state(x, score, "score");
  if (guidance) check_state(x, *guidance, "guidance");
  check_rng(rng, x);
  const auto xc = x.contiguous();
  const auto sc = score.to(x.scalar_type()).contiguous();
  const auto gc = guidance ? guidance->to(x.scalar_type()).contiguous() : at::Tensor();
  const auto rc = rng.contiguous();
  const uint64_t seed = static_cast<uint64_t>(rc.data_ptr<int64_t>()[0]);
  const uint64_t base = static_cast<uint64_t>(rc.data_ptr<int64_t>()[1]) * static_cast<uint64_t>(x.numel());
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "em_step_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.defined() ? gc.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;  // float maths for float tensors, as on the GPU
    const acc_t bdt = static_cast<acc_t>(beta_dt), lm = static_cast<acc_t>(lam);
    const acc_t sq = static_cast<acc_t>(std::sqrt(beta_dt));
    at::parallel_for(0, xc.numel(), 2048, [&](int64_t begin, int64_t end) {
      for_each_normal<acc_t>(seed, base, begin, end, [&](int64_t i, acc_t z) {
        const acc_t g = gp ? static_cast<acc_t>(gp[i]) : acc_t(0);
        op[i] = static_cast<scalar_t>(em_update<acc_t>(xp[i], sp[i], g, z, bdt, lm, sq));
      });
    });
  });
  return out;
}

at::Tensor philox_normal_cpu(const at::Tensor& x, const at::Tensor& rng) {
  TORCH_CHECK(x.device().is_cpu(), "philox_normal_cpu: x must be a CPU tensor");
  check_rng(rng, x);
  const auto rc = rng.contiguous();
  const uint64_t seed = static_cast<uint64_t>(rc.data_ptr<int64_t>()[0]);
  const uint64_t base = static_cast<uint64_t>(rc.data_ptr<int64_t>()[1]) * static_cast<uint64_t>(x.numel());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "philox_normal_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 2048, [&](int64_t begin, int64_t end) {
      for_each_normal<at::opmath_type<scalar_t>>(seed, base, begin, end,
                                                 [&](int64_t i, auto z) { op[i] = static_cast<scalar_t>(z); });
    });
  });
  return out;
}

at::Tensor adjoint_update_cpu(const at::Tensor& a, const at::Tensor& vjp, double beta_dt) {
  TORCH_CHECK(a.device().is_cpu(), "adjoint_update_cpu: a must be a CPU tensor");
  check_state(a, vjp, "vjp");
  const auto ac = a.contiguous();
  const auto vc = vjp.to(a.scalar_type()).contiguous();
  auto out = at::empty_like(ac);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "adjoint_update_cpu", [&] {
    const scalar_t* ap = ac.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, ac.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        op[i] = static_cast<scalar_t>(adjoint_update<at::opmath_type<scalar_t>>(ap[i], vp[i], beta_dt));
    });
  });
  return out;
}

TORCH_LIBRARY(coup_fast_ext, m) {
  m.def("em_step(Tensor x, Tensor score, Tensor? guidance, Tensor rng, float beta_dt, float lam) -> Tensor");
  m.def("philox_normal(Tensor x, Tensor rng) -> Tensor");
  m.def("adjoint_update(Tensor a, Tensor vjp, float beta_dt) -> Tensor");
}

TORCH_LIBRARY_IMPL(coup_fast_ext, CPU, m) {
  m.impl("em_step", &em_step_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
  m.impl("adjoint_update", &adjoint_update_cpu);
}

}  // namespace coup_fast

// The module is imported only to run the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
