// Decode attention over the engine's paged KV pool: one query row per
// sequence attends to positions 0..context_lens[s] of its sequence, read in
// place through its block table. Pool layer layout [slot, kv_head, d]
// (slot = block * block_size + offset), grouped-query: head h reads KV head
// h / (heads / kv_heads).
//
// Grid (heads, seqs); PA_WARPS warps per block each take every PA_WARPS-th
// position with an online softmax (running max, sum and weighted values in
// registers: d / 32 elements per lane), then the warps' partial results are
// merged through shared memory. Arithmetic in f32; d a multiple of 32, at
// most 256.

#define PA_WARPS 4
#define PA_MAX_D 256

template <typename T>
__device__ void paged_attention_impl(T* out, const T* q, const T* kc, const T* vc,
                                     const int* block_tables, const int* context_lens,
                                     int max_blocks, int heads, int kv_heads, int d, int block_size,
                                     float scale) {
    __shared__ float s_m[PA_WARPS], s_l[PA_WARPS];
    __shared__ float s_acc[PA_WARPS * PA_MAX_D];
    const int h = blockIdx.x, s = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (heads / kv_heads);
    const int len = context_lens[s];
    const int per_lane = d / 32;
    float qv[PA_MAX_D / 32], acc[PA_MAX_D / 32];
    const T* qr = q + ((i64)s * heads + h) * d;
#pragma unroll
    for (int e = 0; e < PA_MAX_D / 32; e++) {
        qv[e] = e < per_lane ? to_f32(qr[lane + 32 * e]) * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const int* bt = block_tables + (i64)s * max_blocks;
    for (int p = warp; p < len; p += PA_WARPS) {
        const i64 slot = (i64)bt[p / block_size] * block_size + p % block_size;
        const i64 at = (slot * kv_heads + kvh) * d;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < PA_MAX_D / 32; e++)
            if (e < per_lane) dot += qv[e] * to_f32(kc[at + lane + 32 * e]);
        dot = warp_sum(dot);
        const float m2 = fmaxf(m, dot);
        const float a = __expf(m - m2), b = __expf(dot - m2);
#pragma unroll
        for (int e = 0; e < PA_MAX_D / 32; e++)
            if (e < per_lane) acc[e] = acc[e] * a + b * to_f32(vc[at + lane + 32 * e]);
        l = l * a + b;
        m = m2;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < PA_MAX_D / 32; e++)
        if (e < per_lane) s_acc[warp * PA_MAX_D + lane + 32 * e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float big = NEG_INF;
    for (int w = 0; w < PA_WARPS; w++) big = fmaxf(big, s_m[w]);
    float total = 0.f, wt[PA_WARPS];
    for (int w = 0; w < PA_WARPS; w++) {
        // A warp that saw no position has m = -inf: weight 0.
        wt[w] = s_l[w] > 0.f ? __expf(s_m[w] - big) : 0.f;
        total += s_l[w] * wt[w];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    T* orow = out + ((i64)s * heads + h) * d;
#pragma unroll
    for (int e = 0; e < PA_MAX_D / 32; e++) {
        if (e >= per_lane) continue;
        float o = 0.f;
        for (int w = 0; w < PA_WARPS; w++) o += s_acc[w * PA_MAX_D + lane + 32 * e] * wt[w];
        orow[lane + 32 * e] = from_f32<T>(o * inv);
    }
}

#define PAGED(T, S)                                                                            \
    extern "C" __global__ void paged_attention_##S(                                            \
        T* out, const T* q, const T* kc, const T* vc, const int* block_tables,                 \
        const int* context_lens, int max_blocks, int heads, int kv_heads, int d,               \
        int block_size, float scale) {                                                         \
        paged_attention_impl<T>(out, q, kc, vc, block_tables, context_lens, max_blocks, heads, \
                                kv_heads, d, block_size, scale);                               \
    }
PAGED(float, f32)
PAGED(bf16_t, bf16)
PAGED(f16_t, f16)
