// The per-element maths shared by the CPU (coup_ops.cpp) and CUDA (cuda/coup_ops.cu) ops.
// Pure-torch reference: coup_fast/noise.py (Philox recipe) and coup_fast/sde.py (step formulas).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define COUP_HD __host__ __device__ __forceinline__
#else
#define COUP_HD inline
#endif

namespace coup_fast {

constexpr uint32_t kPhiloxA = 0xD2511F53u;
constexpr uint32_t kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// Philox4x32-10 on counter (lo(offset), hi(offset), 0, 0) with key (lo(seed), hi(seed));
// returns the first two output words.
COUP_HD void philox_4x32(uint64_t seed, uint64_t offset, uint32_t& r0, uint32_t& r1) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(kPhiloxA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kPhiloxB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  r0 = c0;
  r1 = c1;
}

// z = sqrt(-2 log u1) cos(2 pi u2), u1 in (0, 1], u2 in [0, 1): one standard-normal draw
// for element `offset` of the counter stream `seed`.
template <typename acc_t>
COUP_HD acc_t philox_normal(uint64_t seed, uint64_t offset) {
  uint32_t r0, r1;
  philox_4x32(seed, offset, r0, r1);
  const acc_t u1 = static_cast<acc_t>((r0 >> 8) + 1u) * static_cast<acc_t>(5.9604644775390625e-08);
  const acc_t u2 = static_cast<acc_t>(r1 >> 8) * static_cast<acc_t>(5.9604644775390625e-08);
  return sqrt(static_cast<acc_t>(-2) * log(u1)) * cos(static_cast<acc_t>(6.283185307179586) * u2);
}

// x_{k+1} = x_k + beta_k h (x_k / 2 + s + lam g) + sqrt(beta_k h) z_k   (Eq. 5, Euler-Maruyama)
template <typename acc_t>
COUP_HD acc_t em_update(acc_t x, acc_t s, acc_t g, acc_t z, acc_t beta_dt, acc_t lam, acc_t sqrt_beta_dt) {
  return x + beta_dt * (static_cast<acc_t>(0.5) * x + s + lam * g) + sqrt_beta_dt * z;
}

// a_k = a_{k+1} + beta_k h (a_{k+1} / 2 + v),  v = J_s^T a + lam H a   (the discrete adjoint)
template <typename acc_t>
COUP_HD acc_t adjoint_update(acc_t a, acc_t v, acc_t beta_dt) {
  return a + beta_dt * (static_cast<acc_t>(0.5) * a + v);
}

}  // namespace coup_fast
