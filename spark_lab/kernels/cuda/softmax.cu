// Numerically stable softmax over the last axis, one block per row.
// A row that is all -inf comes out as zeros (like the NumPy twin, activations.softmax).
#include "common.cuh"

extern "C" __global__ void softmax_f32(const float* __restrict__ x,   // [rows, n]
                                       float* __restrict__ y,         // [rows, n]
                                       int n) {
    __shared__ float smem[32];
    const float* xr = x + (long long)blockIdx.x * n;
    float* yr = y + (long long)blockIdx.x * n;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, smem);
    if (m == __int_as_float(0xff800000)) m = 0.0f;       // fully masked row: exp(-inf) = 0
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(xr[i] - m);
        yr[i] = e;
        s += e;
    }
    s = block_sum(s, smem);
    float inv = s > 0.0f ? 1.0f / s : 1.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] *= inv;
}
