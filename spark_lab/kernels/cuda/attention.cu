// Single-query attention for decode, grouped-query heads; one block per query head.
// Keys lo <= j < hi are visible (the host folds causal / sliding-window / q_offset into lo, hi).
// k, v may be strided views of a KV cache: element (j, h, d) sits at j * s_t + h * s_h + d.
// NumPy twin: spark_lab.kernels.attention.attention with Tq = 1.
#include "common.cuh"

#define MAX_DV_PER_LANE 8   // Dv <= 256

extern "C" __global__ void attn_decode_f32(const float* __restrict__ q,    // [Hq, D]
                                           const float* __restrict__ k,    // [Tk, Hkv, D] (strided)
                                           const float* __restrict__ v,    // [Tk, Hkv, Dv] (strided)
                                           float* __restrict__ out,        // [Hq, Dv]
                                           float* __restrict__ scores,     // [Hq, n_scores] scratch
                                           int n_scores, int Hq, int Hkv, int D, int Dv,
                                           long long k_st, long long k_sh, long long v_st, long long v_sh,
                                           int lo, int hi, float scale) {
    extern __shared__ float sh[];                  // q [D] | partial sums [n_warps, Dv]
    __shared__ float red[32];
    float* qs = sh;
    float* part = sh + D;
    const int h = blockIdx.x, kvh = h / (Hq / Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    float* sc = scores + (long long)h * n_scores;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[(long long)h * D + d];
    __syncthreads();

    // 1. scores, one warp per key
    float m = __int_as_float(0xff800000);
    for (int j = lo + warp; j < hi; j += n_warps) {
        const float* kr = k + j * k_st + kvh * k_sh;
        float dot = 0.0f;
        for (int d = lane; d < D; d += 32) dot += qs[d] * kr[d];
        dot = warp_sum(dot) * scale;
        if (lane == 0) sc[j] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m, red);

    // 2. softmax numerators and their sum
    float s = 0.0f;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        s += e;
    }
    s = block_sum(s, red);                          // also a barrier: sc is complete after it
    float inv = s > 0.0f ? 1.0f / s : 0.0f;

    // 3. weighted sum of values: warp w takes keys j = lo + w (mod n_warps), lane takes features
    float acc[MAX_DV_PER_LANE];
    for (int c = 0; c < MAX_DV_PER_LANE; ++c) acc[c] = 0.0f;
    for (int j = lo + warp; j < hi; j += n_warps) {
        const float* vr = v + j * v_st + kvh * v_sh;
        float p = sc[j];
        for (int c = 0; c < MAX_DV_PER_LANE; ++c) {
            int d = lane + 32 * c;
            if (d < Dv) acc[c] += p * vr[d];
        }
    }
    for (int c = 0; c < MAX_DV_PER_LANE; ++c) {
        int d = lane + 32 * c;
        if (d < Dv) part[warp * Dv + d] = acc[c];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        float t = 0.0f;
        for (int w = 0; w < n_warps; ++w) t += part[w * Dv + d];
        out[(long long)h * Dv + d] = t * inv;
    }
}
