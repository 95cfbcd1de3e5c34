//! Element-wise ops of the fused one-token CPU step, on f32 host buffers:
//! RMSNorm, rotary embedding in place, SiLU-and-multiply. The CUDA kernels
//! of the same names (`crate::cuda`) are tested against these.

/// `1 / rms(x)` with `eps` (float32 statistics, as Hugging Face).
#[inline]
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `out = x / rms(x) * w` (float32 statistics, as Hugging Face).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = inv_rms(x, eps);
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

/// Rotates each `d`-wide head of `v` in place (rotate-half convention) by
/// angles `pos * inv_freq`.
pub fn rope_in_place(v: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in v.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `out = silu(gate) * up` where `gate_up = [gate; up]`.
pub fn silu_mul(gate_up: &[f32], out: &mut [f32]) {
    let (g, u) = gate_up.split_at(out.len());
    crate::cpu::vecmath::silu_mul(g, u, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn elementwise_kernels_match_libtorch() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 64.0).collect();
        let mut out = vec![0f32; 64];
        rms_norm(&x, &w, 1e-5, &mut out);
        let t = Tensor::from_slice(&x).rms_norm([64], Some(&Tensor::from_slice(&w)), 1e-5);
        let want: Vec<f32> = Vec::try_from(t).unwrap();
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));

        let mut out = vec![0f32; 32];
        silu_mul(&x, &mut out);
        let g = Tensor::from_slice(&x[..32]);
        let want: Vec<f32> = Vec::try_from(g.silu() * Tensor::from_slice(&x[32..])).unwrap();
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
