//! `Linear`: a weight `[out, in]` with optional bias. Up to `SMALL_BATCH`
//! input rows on CPU (decode steps) go through the `gemv` kernel; everything
//! else through libtorch's `linear`.

use tch::{Device, Kind, Tensor};

use crate::gemv::{gemv_batch, pool};

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The bias as f32, for `gemv_into`.
    bias_f32: Option<Vec<f32>>,
    /// The weight is a contiguous CPU f32 or bf16 tensor.
    fast: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight = weight.contiguous();
        let fast =
            weight.device() == Device::Cpu && matches!(weight.kind(), Kind::Float | Kind::BFloat16);
        let bias_f32 = bias
            .as_ref()
            .filter(|_| fast)
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float).view([-1])).expect("bias to f32"));
        Linear {
            weight,
            bias,
            bias_f32,
            fast,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether `gemv_into` may be used (contiguous CPU f32/bf16 weight).
    pub fn has_gemv(&self) -> bool {
        self.fast
    }

    pub fn out_features(&self) -> usize {
        self.weight.size()[0] as usize
    }

    /// `y = W x (+ b)` for one or a few f32 rows (`x`: rows x in, `y`: rows
    /// x out), with the `gemv` kernel: each weight row is read once for all
    /// rows.
    pub fn gemv_into(&self, x: &[f32], y: &mut [f32]) {
        assert!(self.fast, "gemv_into on a weight the kernel does not read");
        let (out_f, in_f) = (
            self.weight.size()[0] as usize,
            self.weight.size()[1] as usize,
        );
        assert_eq!(y.len() * in_f, x.len() * out_f, "gemv_into: rows differ");
        let n = out_f * in_f;
        // SAFETY: the weight is a contiguous CPU tensor of `n` elements of the
        // matched type, immutable and alive as long as `self`.
        unsafe {
            match self.weight.kind() {
                Kind::Float => {
                    let w = std::slice::from_raw_parts(self.weight.data_ptr() as *const f32, n);
                    gemv_batch(pool(), w, in_f, x, y)
                }
                _ => {
                    let w = std::slice::from_raw_parts(self.weight.data_ptr() as *const u16, n);
                    gemv_batch(pool(), w, in_f, x, y)
                }
            }
        }
        if let Some(b) = &self.bias_f32 {
            for row in y.chunks_exact_mut(out_f) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }

    /// Up to this many input rows go through the `gemv` kernel (each weight
    /// row read once for all of them); more through libtorch.
    pub const SMALL_BATCH: i64 = 8;

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let rows: i64 = size[..size.len() - 1].iter().product();
        if !(self.fast && (1..=Self::SMALL_BATCH).contains(&rows)) {
            return x.linear(&self.weight, self.bias.as_ref());
        }
        let (out_f, in_f) = (self.weight.size()[0], self.weight.size()[1]);
        let xf = if x.kind() == Kind::Float && x.is_contiguous() {
            x.shallow_clone()
        } else {
            x.to_kind(Kind::Float).contiguous()
        };
        let y = Tensor::empty([rows, out_f], (Kind::Float, Device::Cpu));
        // SAFETY: `xf` and `y` are contiguous f32 CPU tensors of the stated
        // lengths, alive for the call, and `y` is not aliased.
        unsafe {
            let xs =
                std::slice::from_raw_parts(xf.data_ptr() as *const f32, (rows * in_f) as usize);
            let ys =
                std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, (rows * out_f) as usize);
            self.gemv_into(xs, ys);
        }
        let mut out_size = size;
        *out_size.last_mut().unwrap() = out_f;
        let mut y = y.view(out_size.as_slice());
        if x.kind() != Kind::Float {
            y = y.to_kind(x.kind());
        }
        y
    }
}
