// RMSNorm, alone and fused with the residual add that precedes it in every
// Llama block. One block per row; statistics in f32. Rounding follows
// Hugging Face's LlamaRMSNorm in the storage dtype: the normalized row is
// rounded to T, then multiplied by the weight and rounded again.

// out[r] = T(T(x[r] * rsqrt(mean(x[r]^2) + eps)) * w)
template <typename T>
__device__ void rms_norm_impl(T* out, const T* x, i64 sx, const T* w, int h, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * sx;
    T* outr = out + (i64)blockIdx.x * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        outr[i] = from_f32<T>(round_to<T>(to_f32(xr[i]) * inv) * to_f32(w[i]));
}

// residual[r] <- T(x[r] + residual[r]); x[r] <- rms_norm(residual[r]) * w
template <typename T>
__device__ void fused_add_rms_norm_impl(T* x, i64 sx, T* residual, i64 sr, const T* w, int h, float eps) {
    __shared__ float scratch[32];
    T* xr = x + (i64)blockIdx.x * sx;
    T* rr = residual + (i64)blockIdx.x * sr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = round_to<T>(to_f32(xr[i]) + to_f32(rr[i]));
        rr[i] = from_f32<T>(v);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)h + eps);
    // Each thread reads back only the elements it wrote above.
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        xr[i] = from_f32<T>(round_to<T>(to_f32(rr[i]) * inv) * to_f32(w[i]));
}

#define RMS_NORM(T, S)                                                                         \
    extern "C" __global__ void rms_norm_##S(T* out, const T* x, i64 sx, const T* w, int h,     \
                                            float eps) {                                       \
        rms_norm_impl<T>(out, x, sx, w, h, eps);                                               \
    }                                                                                          \
    extern "C" __global__ void fused_add_rms_norm_##S(T* x, i64 sx, T* residual, i64 sr,       \
                                                      const T* w, int h, float eps) {          \
        fused_add_rms_norm_impl<T>(x, sx, residual, sr, w, h, eps);                            \
    }
RMS_NORM(float, f32)
RMS_NORM(bf16_t, bf16)
RMS_NORM(f16_t, f16)
