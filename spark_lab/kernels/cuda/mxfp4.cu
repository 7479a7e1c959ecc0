// MXFP4 mat-vec for decode and the expert gather of an MoE layer, over raw GGML blocks.
//   MXFP4 block (17 B): u8 e (E8M0 scale 2^(e-127)), u8 q[16] (E2M1 codes);
//   w[i] = K[q[i] & 15] * 2^(e-128), w[i+16] = K[q[i] >> 4] * 2^(e-128), i < 16,
//   K = the E2M1 values doubled {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12}, hence the halved scale.
// One warp per output row, as in qmatvec.cu: a warp walks 4 blocks at a time, 8 lanes per block,
// each lane 2 code bytes (4 weights). Blocks are 17 bytes, so nothing past a byte is aligned:
// bytes are loaded one by one. Launch: block = 32 * warps threads, grid = (ceil(rows / warps), n).
// NumPy twin: x @ spark_lab.quants.dequantize(W).T (per selected expert for the gather).
#include "common.cuh"

__device__ __forceinline__ float e2m1_x2(unsigned int c) {
    // sign bit 3; magnitude codes 0..7 -> 0 1 2 3 4 6 8 12: byte (c & 7) of the 8-byte table
    const float v = (float)(__byte_perm(0x03020100u, 0x0C080604u, c & 7u) & 0xFFu);
    return (c & 8u) ? -v : v;
}

__device__ __forceinline__ float e8m0_half(unsigned int e) {
    // 2^(e - 128) as float32 bits: subnormals for e = 0, 1
    return __uint_as_float(e < 2u ? (0x00200000u << e) : ((e - 1u) << 23));
}

// sum_c x[c] * W[row, c] for one row of nb blocks; every lane of the warp gets the sum
__device__ __forceinline__ float mxfp4_row_dot(const unsigned char* __restrict__ wr, const float* __restrict__ xr,
                                               int nb, int lane) {
    const int sub = lane & 7;
    float acc = 0.0f;
#pragma unroll 4
    for (int b = lane >> 3; b < nb; b += 4) {                           // unrolled: loads of 4 steps in flight
        const unsigned char* blk = wr + (long long)b * 17;
        const float d = e8m0_half(blk[0]);
        const unsigned int q0 = blk[1 + 2 * sub], q1 = blk[2 + 2 * sub];
        const float* xl = xr + b * 32 + 2 * sub;                        // low nibbles: weights 2 sub, 2 sub + 1
        const float* xh = xl + 16;                                      // high nibbles: 16 + 2 sub, 17 + 2 sub
        const float s = e2m1_x2(q0 & 15u) * xl[0] + e2m1_x2(q1 & 15u) * xl[1]
                      + e2m1_x2(q0 >> 4) * xh[0] + e2m1_x2(q1 >> 4) * xh[1];
        acc += d * s;
    }
    return warp_sum(acc);
}

extern "C" __global__ void mxfp4_matvec(const unsigned char* __restrict__ W,   // [rows, cols/32 * 17]
                                        const float* __restrict__ x,           // [n, cols]
                                        float* __restrict__ y,                 // [n, rows]
                                        int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;                                            // the whole warp: one row per warp
    const int nb = cols / 32;
    const float s = mxfp4_row_dot(W + (long long)row * nb * 17, x + (long long)blockIdx.y * cols, nb, lane);
    if (lane == 0) y[(long long)blockIdx.y * rows + row] = s;
}

// y[j] = x_j @ dequant(W[ids[j]]).T for the k selected experts (grid.y = k); only their rows are read.
// x_stride 0: one x for all experts (gate, up); x_stride = cols: row j of x for expert j (down).
// An id outside [0, n_expert) gives a NaN row (the wrapper checks ids before launching).
extern "C" __global__ void mxfp4_moe_matvec(const unsigned char* __restrict__ W,  // [n_expert, rows, cols/32 * 17]
                                            const float* __restrict__ x,          // [1 or k, cols]
                                            const int* __restrict__ ids,          // [k]
                                            float* __restrict__ y,                // [k, rows]
                                            int rows, int cols, int x_stride, int n_expert) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int j = blockIdx.y;
    const int e = ids[j];
    float* out = y + (long long)j * rows + row;
    if (e < 0 || e >= n_expert) {
        if (lane == 0) *out = __int_as_float(0x7fc00000);
        return;
    }
    const int nb = cols / 32;
    const unsigned char* wr = W + ((long long)e * rows + row) * nb * 17;
    const float s = mxfp4_row_dot(wr, x + (long long)j * x_stride, nb, lane);
    if (lane == 0) *out = s;
}
