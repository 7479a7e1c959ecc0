// RMSNorm, one block per row: y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * (w + offset).
// NumPy twin: spark_lab.kernels.norms.rmsnorm.
#include "common.cuh"

extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x,   // [rows, d]
                                       const float* __restrict__ w,   // [d]
                                       float* __restrict__ y,         // [rows, d]
                                       int d, float eps, float offset) {
    __shared__ float smem[32];
    const float* xr = x + (long long)blockIdx.x * d;
    float* yr = y + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i];
        ss += v * v;
    }
    ss = block_sum(ss, smem);
    float r = rsqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * r * (w[i] + offset);
}
