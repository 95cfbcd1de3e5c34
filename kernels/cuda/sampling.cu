// Token selection on the device, one block of SAMPLE_THREADS per row of f32
// logits: greedy (temperature <= 0 or top_k == 1: the first index of the
// largest logit, as torch.argmax), else temperature, then top-k, then top-p
// (the smallest set of the largest probabilities whose mass reaches p), then
// one draw by inverse CDF in vocabulary order with the caller's uniform
// number u in [0, 1) (drawn on the host from the request's seed, so a seed
// reproduces a generation whatever the batch).
//
// No sort: both cut-offs are thresholds on an order-preserving integer key
// of the logit, found bit by bit from the top (32 block-wide counting passes
// for top-k, 32 mass passes for top-p). Ties at a threshold are all kept.
// Also writes the chosen token's log-probability under the model's
// distribution (temperature 1, before truncation).

#define SAMPLE_THREADS 256

__device__ __forceinline__ u32 order_key(float v) {
    const u32 u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Mass of the logits whose key is at least t, exp((l - max) / T).
__device__ float mass_ge(const float* l, int vocab, u32 t, float top, float inv_t, float* scratch) {
    float s = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (order_key(l[i]) >= t) s += __expf((l[i] - top) * inv_t);
    return block_sum(s, scratch);
}

__device__ float count_ge(const float* l, int vocab, u32 t, float* scratch) {
    float c = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += order_key(l[i]) >= t ? 1.f : 0.f;
    return block_sum(c, scratch);
}

extern "C" __global__ void sample_f32(i64* out_ids, float* out_logprobs, const float* logits,
                                      i64 stride, int vocab, const float* temperature,
                                      const int* top_k, const float* top_p,
                                      const float* uniform) {
    __shared__ float scratch[32];
    __shared__ float s_best[32];
    __shared__ int s_best_i[32];
    __shared__ float s_part[SAMPLE_THREADS];
    __shared__ int s_pick_thread;
    __shared__ float s_pick_rest;
    __shared__ int s_id;
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* l = logits + (i64)r * stride;

    // Largest logit and its first index.
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (l[i] > best) { best = l[i]; best_i = i; }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ob > best || (ob == best && oi < best_i)) { best = ob; best_i = oi; }
    }
    if (lane == 0) { s_best[warp] = best; s_best_i[warp] = best_i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (s_best[w] > best || (s_best[w] == best && s_best_i[w] < best_i)) {
                best = s_best[w];
                best_i = s_best_i[w];
            }
        s_best[0] = best;
        s_best_i[0] = best_i;
    }
    __syncthreads();
    const float top = s_best[0];
    const int top_i = s_best_i[0];
    const float z = mass_ge(l, vocab, 0u, top, 1.f, scratch);

    const float t = temperature[r];
    const int k = top_k[r];
    const float p = top_p[r];
    int id = top_i;
    if (t > 0.f && k != 1) {
        const float inv_t = 1.f / t;
        u32 tk = 0;
        if (k > 0 && k < vocab)
            for (int bit = 31; bit >= 0; bit--) {
                const u32 cand = tk | (1u << bit);
                if (count_ge(l, vocab, cand, scratch) >= (float)k) tk = cand;
            }
        u32 tau = tk;
        if (p < 1.f) {
            const float need = p * mass_ge(l, vocab, tk, top, inv_t, scratch);
            u32 tp = 0;
            for (int bit = 31; bit >= 0; bit--) {
                const u32 cand = tp | (1u << bit);
                if (mass_ge(l, vocab, cand > tk ? cand : tk, top, inv_t, scratch) >= need) tp = cand;
            }
            tau = tp > tk ? tp : tk;
        }
        // Inverse CDF in vocabulary order: each thread sums a contiguous
        // chunk, thread 0 finds the chunk holding u * mass, its thread
        // walks it.
        const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const int lo = threadIdx.x * chunk, hi = min(vocab, lo + chunk);
        float part = 0.f;
        for (int i = lo; i < hi; i++)
            if (order_key(l[i]) >= tau) part += __expf((l[i] - top) * inv_t);
        s_part[threadIdx.x] = part;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = 0.f;
            for (int j = 0; j < (int)blockDim.x; j++) total += s_part[j];
            float rest = uniform[r] * total;
            int pick = -1;
            for (int j = 0; j < (int)blockDim.x; j++) {
                if (s_part[j] <= 0.f) continue;
                pick = j;  // the last chunk with mass, if rounding runs past the end
                if (rest < s_part[j]) break;
                rest -= s_part[j];
            }
            s_pick_thread = pick;
            s_pick_rest = rest;
            s_id = top_i;
        }
        __syncthreads();
        if ((int)threadIdx.x == s_pick_thread) {
            float rest = s_pick_rest;
            int last = -1;
            for (int i = lo; i < hi; i++) {
                if (order_key(l[i]) < tau) continue;
                last = i;
                const float w = __expf((l[i] - top) * inv_t);
                if (rest < w) break;
                rest -= w;
            }
            s_id = last;
        }
        __syncthreads();
        id = s_id;
    }
    if (threadIdx.x == 0) {
        out_ids[r] = id;
        out_logprobs[r] = l[id] - top - __logf(z);
    }
}
