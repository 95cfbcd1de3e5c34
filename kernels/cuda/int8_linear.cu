// Weight-only int8 matrix-vector products for decode steps: y[m, n] =
// scales[n] * sum_k x[m, k] * w[n, k] for up to 8 input rows, each int8
// weight row read once for all of them. One warp per output row, four
// weights (one 32-bit load) per lane per step; k a multiple of 4.

#define I8_MAX_M 8

template <typename T>
__device__ void int8_linear_impl(T* y, const T* x, const signed char* w, const float* scales,
                                 int m, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const int* wr = (const int*)(w + (i64)row * k);
    float acc[I8_MAX_M];
#pragma unroll
    for (int i = 0; i < I8_MAX_M; i++) acc[i] = 0.f;
    for (int j = lane; j < k / 4; j += 32) {
        const int p = wr[j];
        const float w0 = (float)((p << 24) >> 24), w1 = (float)((p << 16) >> 24);
        const float w2 = (float)((p << 8) >> 24), w3 = (float)(p >> 24);
#pragma unroll
        for (int i = 0; i < I8_MAX_M; i++) {
            if (i >= m) break;
            const T* xr = x + (i64)i * k + 4 * j;
            acc[i] += w0 * to_f32(xr[0]) + w1 * to_f32(xr[1]) + w2 * to_f32(xr[2]) +
                      w3 * to_f32(xr[3]);
        }
    }
    const float sc = scales[row];
#pragma unroll
    for (int i = 0; i < I8_MAX_M; i++) {
        if (i >= m) break;
        const float v = warp_sum(acc[i]);
        if (lane == 0) y[(i64)i * n + row] = from_f32<T>(v * sc);
    }
}

#define INT8_LINEAR(T, S)                                                                      \
    extern "C" __global__ void int8_linear_##S(T* y, const T* x, const signed char* w,         \
                                               const float* scales, int m, int n, int k) {     \
        int8_linear_impl<T>(y, x, w, scales, m, n, k);                                         \
    }
INT8_LINEAR(float, f32)
INT8_LINEAR(bf16_t, bf16)
INT8_LINEAR(f16_t, f16)
