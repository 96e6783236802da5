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

// Precision-true maths: the float overloads stay in float on the host too (plain cos(float)
// may resolve to the double function there).
COUP_HD float math_log(float v) { return logf(v); }
COUP_HD double math_log(double v) { return log(v); }
COUP_HD float math_sqrt(float v) { return sqrtf(v); }
COUP_HD double math_sqrt(double v) { return sqrt(v); }
COUP_HD float math_cos(float v) { return cosf(v); }
COUP_HD double math_cos(double v) { return cos(v); }
COUP_HD float math_sin(float v) { return sinf(v); }
COUP_HD double math_sin(double v) { return sin(v); }

// z = sqrt(-2 log u1) cos(2 pi u2) from the two Philox words: u1 = ((r0 >> 8) + 1) / 2^24 in (0, 1],
// u2 = (r1 >> 8) / 2^24 in [0, 1).  u2 has 24 bits, so 4 u2 = quadrant + f splits exactly and
// cos(2 pi u2) is +-cos or +-sin of (pi/2) f, an argument below pi/2.  That keeps fp32 arithmetic
// (fast on the CPU, native on the GPU) within ~1e-6 of the float64 reference in
// coup_fast/noise.py for every draw, not just the typical one.
template <typename acc_t>
COUP_HD acc_t box_muller(uint32_t r0, uint32_t r1) {
  const acc_t u1 = static_cast<acc_t>((r0 >> 8) + 1u) * static_cast<acc_t>(5.9604644775390625e-08);
  const uint32_t quadrant = r1 >> 30;  // the top two of u2's 24 bits
  const acc_t angle = static_cast<acc_t>((r1 >> 8) & 0x3FFFFFu) * static_cast<acc_t>(2.384185791015625e-07) *
                      static_cast<acc_t>(1.5707963267948966);  // (pi/2) f, f = low 22 bits / 2^22
  // quadrants 0..3: cos a, -sin a, -cos a, sin a
  const acc_t trig = (quadrant & 1u) ? math_sin(angle) : math_cos(angle);
  const acc_t cos_2pi_u2 = (quadrant == 1u || quadrant == 2u) ? -trig : trig;
  return math_sqrt(static_cast<acc_t>(-2) * math_log(u1)) * cos_2pi_u2;
}

// One standard-normal draw for element `offset` of the counter stream `seed`.
template <typename acc_t>
COUP_HD acc_t philox_normal(uint64_t seed, uint64_t offset) {
  uint32_t r0, r1;
  philox_4x32(seed, offset, r0, r1);
  return box_muller<acc_t>(r0, r1);
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
