// SiLU-and-multiply of the fused gate/up projection: input rows are
// [gate (inter) | up (inter)], out[r, j] = T(T(silu(gate)) * up) (Hugging
// Face rounds the activation to the storage dtype before the product).
// Grid (rows, column blocks).

template <typename T>
__device__ void silu_and_mul_impl(T* out, const T* in, i64 s_in, int inter) {
    const i64 row = blockIdx.y;
    const T* r = in + row * s_in;
    T* o = out + row * inter;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < inter; j += gridDim.x * blockDim.x) {
        const float g = to_f32(r[j]), u = to_f32(r[inter + j]);
        o[j] = from_f32<T>(round_to<T>(g / (1.f + __expf(-g))) * u);
    }
}

#define SILU(T, S)                                                                             \
    extern "C" __global__ void silu_and_mul_##S(T* out, const T* in, i64 s_in, int inter) {    \
        silu_and_mul_impl<T>(out, in, s_in, inter);                                            \
    }
SILU(float, f32)
SILU(bf16_t, bf16)
SILU(f16_t, f16)
