// Rotary position embedding, one thread per feature pair of one (token, head) row.
// normal (neox = 0): pairs (2i, 2i+1); neox = 1: pairs (i, i + rd/2). Features >= rd are copied.
// Angles in double (pos * freq_scale * theta^(-2i/rd)) so long contexts keep their precision,
// as the NumPy twin (spark_lab.kernels.rope.rope) does.

extern "C" __global__ void rope_f32(const float* __restrict__ x,          // [T, H, D]
                                    const long long* __restrict__ pos,    // [T]
                                    float* __restrict__ y,                // [T, H, D]
                                    int T, int H, int D, int rd, int neox,
                                    double theta, double freq_scale) {
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
        double ang = (double)pos[t] * (freq_scale * pow(theta, -2.0 * i / rd));
        float c = (float)cos(ang), s = (float)sin(ang);
        float x0 = xr[a], x1 = xr[b];
        yr[a] = x0 * c - x1 * s;
        yr[b] = x0 * s + x1 * c;
    } else {
        yr[2 * i] = xr[2 * i];
        yr[2 * i + 1] = xr[2 * i + 1];
    }
}
