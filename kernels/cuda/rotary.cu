// Rotary position embedding applied in place to q and k (Hugging Face's
// rotate-half layout: element j pairs with j + d/2). One block per token;
// threads over (heads + kv_heads) * d/2 pairs. `cos_sin` is an f32 table
// [max_position, d]: cos(pos * inv_freq) in the first half, sin in the
// second, so every rope scaling (llama3, linear) is the table's business.
// A position outside the table leaves its row untouched (the caller
// validates positions against max_position before the step).

template <typename T>
__device__ void rotary_impl(T* q, i64 sqt, i64 sqh, int heads, T* k, i64 skt, i64 skh, int kv_heads,
                            int d, const i64* positions, const float* cos_sin, i64 max_pos) {
    const int t = blockIdx.x;
    const i64 pos = positions[t];
    if (pos < 0 || pos >= max_pos) return;
    const int half = d / 2;
    const float* cs = cos_sin + pos * d;
    const int pairs = (heads + kv_heads) * half;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int hh = i / half, j = i % half;
        T* base = hh < heads ? q + t * sqt + hh * sqh : k + t * skt + (i64)(hh - heads) * skh;
        const float c = cs[j], s = cs[half + j];
        const float x1 = to_f32(base[j]), x2 = to_f32(base[j + half]);
        base[j] = from_f32<T>(x1 * c - x2 * s);
        base[j + half] = from_f32<T>(x2 * c + x1 * s);
    }
}

#define ROTARY(T, S)                                                                           \
    extern "C" __global__ void rotary_##S(T* q, i64 sqt, i64 sqh, int heads, T* k, i64 skt,    \
                                          i64 skh, int kv_heads, int d, const i64* positions,  \
                                          const float* cos_sin, i64 max_pos) {                 \
        rotary_impl<T>(q, sqt, sqh, heads, k, skt, skh, kv_heads, d, positions, cos_sin,       \
                       max_pos);                                                               \
    }
ROTARY(float, f32)
ROTARY(bf16_t, bf16)
ROTARY(f16_t, f16)
