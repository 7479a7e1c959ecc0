// Quantized mat-vec for decode: y[n, r] = sum_c x[n, c] * W[r, c], W kept as raw GGML blocks.
// One warp per output row; a warp walks 4 blocks of 32 weights at a time, 8 lanes per block,
// so neighbouring lanes read neighbouring bytes of W and neighbouring floats of x.
//   Q8_0 block (34 B): f16 d, int8 q[32];        w = d * q
//   Q4_1 block (20 B): f16 d, f16 m, u8 q[16];   w[i] = d * (q[i] & 15) + m, w[i+16] = d * (q[i] >> 4) + m
// NumPy twin: x @ gguf.quants.dequantize(W).T (spark_lab.quants.quant_matmul).
#include "common.cuh"

extern "C" __global__ void qmatvec_q8_0(const unsigned char* __restrict__ W,   // [rows, cols/32 * 34]
                                        const float* __restrict__ x,           // [n, cols]
                                        float* __restrict__ y,                 // [n, rows]
                                        int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int nb = cols / 32, sub = lane & 7;
    const unsigned char* wr = W + (long long)row * nb * 34;
    const float* xr = x + (long long)blockIdx.y * cols;
    float acc = 0.0f;
    for (int b = lane >> 3; b < nb; b += 4) {
        const unsigned char* blk = wr + b * 34;
        float d = half_bits_to_float(*(const unsigned short*)blk);
        const unsigned short* qp = (const unsigned short*)(blk + 2 + sub * 4);
        unsigned short q01 = qp[0], q23 = qp[1];
        const float* xb = xr + b * 32 + sub * 4;
        float s = (float)(signed char)(q01 & 0xff) * xb[0] + (float)(signed char)(q01 >> 8) * xb[1]
                + (float)(signed char)(q23 & 0xff) * xb[2] + (float)(signed char)(q23 >> 8) * xb[3];
        acc += d * s;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)blockIdx.y * rows + row] = acc;
}

extern "C" __global__ void qmatvec_q4_1(const unsigned char* __restrict__ W,   // [rows, cols/32 * 20]
                                        const float* __restrict__ x,           // [n, cols]
                                        float* __restrict__ y,                 // [n, rows]
                                        int rows, int cols) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int nb = cols / 32, sub = lane & 7;
    const unsigned char* wr = W + (long long)row * nb * 20;
    const float* xr = x + (long long)blockIdx.y * cols;
    float acc = 0.0f;
    for (int b = lane >> 3; b < nb; b += 4) {
        const unsigned char* blk = wr + b * 20;
        float d = half_bits_to_float(*(const unsigned short*)blk);
        float m = half_bits_to_float(*(const unsigned short*)(blk + 2));
        unsigned short q = *(const unsigned short*)(blk + 4 + sub * 2);   // bytes i, i+1 (i = 2*sub)
        const float* xl = xr + b * 32 + sub * 2;                          // low nibbles: weights i, i+1
        const float* xh = xl + 16;                                        // high nibbles: i+16, i+17
        float sq = (float)(q & 0xf) * xl[0] + (float)((q >> 8) & 0xf) * xl[1]
                 + (float)((q >> 4) & 0xf) * xh[0] + (float)(q >> 12) * xh[1];
        float sx = xl[0] + xl[1] + xh[0] + xh[1];
        acc += d * sq + m * sx;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)blockIdx.y * rows + row] = acc;
}
