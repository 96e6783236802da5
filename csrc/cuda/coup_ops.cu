// CUDA twins of the ops in ../coup_ops.cpp (same schema, same maths from coup_math.h).
// The seed and step are read from device memory (rng), never passed as kernel scalars, so a
// captured CUDA graph draws fresh noise after a new seed is written into rng.
// Only ATen core + c10/cuda headers (not torch/extension.h or ATen/cuda/CUDAContext.h, which pull in
// cuBLAS/cuSPARSE headers): the file then compiles with a bare CUDA toolkit too (tests/test_cuda_compile.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../coup_math.h"

namespace coup_fast {

namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Maths in at::opmath_type<scalar_t>: float for float/half/bf16 tensors, double for double, as on the CPU.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void em_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                               const scalar_t* __restrict__ g, const int64_t* __restrict__ rng,
                               scalar_t* __restrict__ out, int64_t n, acc_t beta_dt, acc_t lam, acc_t sqrt_beta_dt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]) * static_cast<uint64_t>(n) + static_cast<uint64_t>(i);
  const acc_t z = philox_normal<acc_t>(seed, offset);
  const acc_t gi = g ? static_cast<acc_t>(g[i]) : acc_t(0);
  out[i] = static_cast<scalar_t>(em_update<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(s[i]), gi, z,
                                                  beta_dt, lam, sqrt_beta_dt));
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void philox_normal_kernel(const int64_t* __restrict__ rng, scalar_t* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t offset = static_cast<uint64_t>(rng[1]) * static_cast<uint64_t>(n) + static_cast<uint64_t>(i);
  out[i] = static_cast<scalar_t>(philox_normal<acc_t>(static_cast<uint64_t>(rng[0]), offset));
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void adjoint_update_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ v,
                                      scalar_t* __restrict__ out, int64_t n, acc_t beta_dt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = static_cast<scalar_t>(adjoint_update<acc_t>(static_cast<acc_t>(a[i]), static_cast<acc_t>(v[i]), beta_dt));
}

}  // namespace

at::Tensor em_step_cuda(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& guidance,
                        const at::Tensor& rng, double beta_dt, double lam) {
  TORCH_CHECK(x.is_cuda(), "em_step_cuda: x must be a CUDA tensor");
  TORCH_CHECK(score.sizes() == x.sizes() && score.device() == x.device(), "score must match x in shape and device");
  TORCH_CHECK(rng.dtype() == at::kLong && rng.numel() == 2 && rng.device() == x.device(),
              "rng must be an int64 (seed, step) tensor of 2 elements on the device of x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto sc = score.to(x.scalar_type()).contiguous();
  at::Tensor gc;
  if (guidance) {
    TORCH_CHECK(guidance->sizes() == x.sizes() && guidance->device() == x.device(), "guidance must match x");
    gc = guidance->to(x.scalar_type()).contiguous();
  }
  const auto rc = rng.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "em_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    em_step_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), gc.defined() ? gc.data_ptr<scalar_t>() : nullptr,
        rc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n, static_cast<acc_t>(beta_dt), static_cast<acc_t>(lam),
        static_cast<acc_t>(std::sqrt(beta_dt)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_normal_cuda(const at::Tensor& x, const at::Tensor& rng) {
  TORCH_CHECK(x.is_cuda() && rng.device() == x.device() && rng.dtype() == at::kLong && rng.numel() == 2,
              "philox_normal_cuda: x and an int64 (seed, step) rng on the same CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto rc = rng.contiguous();
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "philox_normal_cuda", [&] {
    philox_normal_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor adjoint_update_cuda(const at::Tensor& a, const at::Tensor& vjp, double beta_dt) {
  TORCH_CHECK(a.is_cuda() && vjp.sizes() == a.sizes() && vjp.device() == a.device(),
              "adjoint_update_cuda: a and vjp must be CUDA tensors of one shape");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous();
  const auto vc = vjp.to(a.scalar_type()).contiguous();
  auto out = at::empty_like(ac);
  const int64_t n = ac.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "adjoint_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    adjoint_update_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ac.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, static_cast<acc_t>(beta_dt));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(coup_fast_ext, CUDA, m) {
  m.impl("em_step", &em_step_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
  m.impl("adjoint_update", &adjoint_update_cuda);
}

}  // namespace coup_fast
