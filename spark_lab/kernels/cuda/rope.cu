// Rotary position embedding, one thread per feature pair of one (token, head) row.
// normal (neox = 0): pairs (2i, 2i+1); neox = 1: pairs (i, i + rd/2). Features >= rd are copied.
// inv_freq [rd/2] comes from the host (spark_lab.kernels.rope.rope_freqs: plain, linear, llama3
// frequency factors or YaRN), so every scaling is one kernel; angles in double (pos * inv_freq)
// so long contexts keep their precision, as the NumPy twin (spark_lab.kernels.rope.rope) does.
// cos/sin are multiplied by mscale (YaRN's attention factor; 1 otherwise).

extern "C" __global__ void rope_f32(const float* __restrict__ x,          // [T, H, D]
                                    const long long* __restrict__ pos,    // [T]
                                    const double* __restrict__ inv_freq,  // [rd/2]
                                    float* __restrict__ y,                // [T, H, D]
                                    int T, int H, int D, int rd, int neox, double mscale) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int half_d = D / 2;
    if (idx >= (long long)T * H * half_d) return;
    int i = (int)(idx % half_d);
    long long row = idx / half_d;                  // t * H + h
    int t = (int)(row / H);
    const float* xr = x + row * D;
    float* yr = y + row * D;
    if (i < rd / 2) {
        int a = neox ? i : 2 * i;
        int b = neox ? i + rd / 2 : 2 * i + 1;
        double ang = (double)pos[t] * inv_freq[i];
        float c = (float)(cos(ang) * mscale), s = (float)(sin(ang) * mscale);
        float x0 = xr[a], x1 = xr[b];
        yr[a] = x0 * c - x1 * s;
        yr[b] = x0 * s + x1 * c;
    } else {
        yr[2 * i] = xr[2 * i];
        yr[2 * i + 1] = xr[2 * i + 1];
    }
}
